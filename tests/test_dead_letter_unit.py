"""A dead letter keeps its event time readable: one 13-digit epoch-millisecond time in ten passes the Luhn
check, and masking it broke the copy's JSON (found replaying dead letters). PANs are still masked everywhere,
a PAN-length number in the `ts` field included."""

from __future__ import annotations

import orjson
import pytest

from featurestore.entity import luhn_valid
from featurestore.events import dead_letter

pytestmark = pytest.mark.unit
PAN = "4539578763621486"


def luhn_valid_times(n: int) -> list[int]:
    out, t = [], 1_796_036_810_000
    while len(out) < n:
        t += 1
        if luhn_valid(str(t)):
            out.append(t)
    return out


@pytest.mark.parametrize("spacing", [b'"ts":%d', b'"ts" : %d'])
def test_an_event_time_that_passes_luhn_survives_and_the_pan_does_not(spacing):
    for ts in luhn_valid_times(20):
        value = b'{"txn_id":"a","cc_num":"%s","amount":1.0,' % PAN.encode() + spacing % ts + b',"merchant":"m"}'
        _, copy, _ = dead_letter(value, None, reason="future", detail="x", topic="t", partition=0, offset=1)
        body = orjson.loads(copy)
        assert body["ts"] == ts
        assert PAN not in copy.decode() and body["cc_num"].endswith(PAN[-4:])


def test_a_pan_in_the_ts_field_or_out_of_time_range_is_masked():
    for value in (b'{"ts":%s}' % PAN.encode(), b'{"ts":"%s"}' % PAN.encode(), b'{"other":1796036810093}'):
        _, copy, _ = dead_letter(value, None, reason="bad_ts", detail="x", topic="t", partition=0, offset=1)
        assert PAN.encode() not in copy
    _, copy, _ = dead_letter(b'{"other":1796036810093}', None, reason="x", detail="x", topic="t", partition=0,
                             offset=1)
    assert b"1796036810093" not in copy, "only the ts field is exempt: a Luhn-valid run elsewhere is masked"
