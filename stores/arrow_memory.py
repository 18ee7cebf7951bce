"""Which allocator Arrow uses in a batch process.

pyarrow's default pool (mimalloc) hands the large buffers of a backfill back to the operating system as soon as
they are freed, so the next filter, cast or Parquet page faults them in again; on the machines measured here a
fresh page costs ~2.5 us, and splitting the seed-scale backfill's result into nightly tables took 2.0 s against
0.65 s with jemalloc, which keeps freed memory for reuse (bench/RESULTS.md, thirteenth session)."""

from __future__ import annotations

import logging
import os

import pyarrow as pa

log = logging.getLogger(__name__)

#: Arrow's own switch: where a user set it, their choice stands.
POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def use_batch_allocator() -> str:
    """Make jemalloc this process's default Arrow pool where pyarrow has it (its Linux and macOS wheels) and the
    user did not choose one; returns the backend in use. Buffers already allocated keep their own pool."""
    if not os.environ.get(POOL_ENV):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:  # a build without jemalloc (Windows wheels): keep the default
            log.debug("pyarrow has no jemalloc here; keeping %s", pa.default_memory_pool().backend_name)
    return pa.default_memory_pool().backend_name
