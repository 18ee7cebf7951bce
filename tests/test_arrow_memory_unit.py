"""The batch process's Arrow allocator: jemalloc where pyarrow has it, unless the user chose a pool."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine
from stores.arrow_memory import POOL_ENV, use_batch_allocator
from tests import synthetic

pytestmark = pytest.mark.unit


@pytest.fixture
def system_pool(monkeypatch):
    """Start from the system allocator; restore the process's pool afterwards."""
    before = pa.default_memory_pool()
    monkeypatch.delenv(POOL_ENV, raising=False)
    pa.set_memory_pool(pa.system_memory_pool())
    yield
    pa.set_memory_pool(before)


def test_jemalloc_is_chosen_when_the_user_chose_nothing(system_pool):
    assert use_batch_allocator() == "jemalloc"
    assert pa.default_memory_pool().backend_name == "jemalloc"


def test_a_pool_the_user_chose_stands(system_pool, monkeypatch):
    monkeypatch.setenv(POOL_ENV, "system")
    assert use_batch_allocator() == "system"
    assert pa.default_memory_pool().backend_name == "system"


def test_opening_an_engine_switches_the_pool(system_pool, tmp_path):
    path = tmp_path / "history.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic.history(n=200, cards=5, seed=3)), path)
    eng = open_engine("duckdb", offline_dir=tmp_path, history=path, secret="s")
    eng.close()
    assert pa.default_memory_pool().backend_name == "jemalloc"
