"""The Redis floor bench's variants are what they say: its text edits of the scripts must still apply, or the
bounds it prints would silently measure the unchanged script."""

from __future__ import annotations

import pytest

from bench.bench_redis_floor import FLOOR_SCRIPT, FLOOR_TWO_CALLS_SCRIPT, without_window_write
from stores.redis_online import _script

pytestmark = pytest.mark.unit


def test_the_two_call_floor_makes_no_zadd_and_keeps_the_other_calls():
    assert "ZADD" in FLOOR_SCRIPT and "ZADD" not in FLOOR_TWO_CALLS_SCRIPT
    for call in ("call('HMGET'", "call('HSET'"):
        assert FLOOR_TWO_CALLS_SCRIPT.count(call) == FLOOR_SCRIPT.count(call) == 1


def test_the_apply_script_minus_its_window_write_drops_only_that_call():
    apply = _script("apply_events.lua")
    cut = without_window_write(apply)
    assert "'ZADD'" in apply and "'ZADD'" not in cut
    assert len(apply) - len(cut) == len("many('ZADD', wk, zadd, nz)")
    with pytest.raises(SystemExit, match="ZADD call moved"):
        without_window_write(cut)
