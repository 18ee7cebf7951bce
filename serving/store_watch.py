"""The scoring API notices an emptied online store (Redis restarted without persistence, or flushed) and says so.

The stream worker keeps a marker key `<prefix>:meta:instance` in Redis (streaming.batch_sink.RedisWatch). The API
only reads it (its Redis user may not write), every `every_s` seconds off the request path: a marker that
disappears or is replaced by another one means the windows, arrival sequences and snapshots were lost. The API
logs one ERROR pointing to `velocity features rebuild`, counts it (`velocity_api_redis_data_lost_total`) and keeps
answering (scores on partial windows until the rebuild) — a restart would not bring the data back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)


class StoreLossWatch:
    """Polls the worker's instance marker and reports when the online store lost its data."""

    def __init__(self, where: str, registry: CollectorRegistry, every_s: float = 5.0) -> None:
        """Once per app (its metrics live in the app's registry); `start` attaches it to the store's client."""
        self.client, self.key, self.where, self.every_s = None, "", where, every_s
        self.seen: bytes | None = None  # the marker last read (None: absent, or never read)
        self.checked = False
        self.losses = 0
        self.lost = Counter("velocity_api_redis_data_lost",
                            "Times the online store was found emptied (the stream worker's marker gone or replaced): "
                            "run `velocity features rebuild`", registry=registry)
        self.lost_at = Gauge("velocity_api_redis_data_lost_timestamp_seconds",
                             "When the API last found the online store emptied (Unix time; 0: never)",
                             registry=registry)
        self._task: asyncio.Task | None = None

    async def check(self) -> bool:
        """Read the marker once; False when it shows a loss since the last read (reported here)."""
        try:
            current = await self.client.get(self.key)
        except Exception:  # Redis down: /readyz and the 503s say so; a loss shows when it is back
            return True
        first, previous = not self.checked, self.seen
        self.checked, self.seen = True, current
        if first:
            if current is None:
                log.warning("online store (Redis at %s) has no marker %s: it is empty or no stream worker has "
                            "written to it yet; if Redis was emptied, run `velocity features rebuild`", self.where,
                            self.key)
            return True
        if previous is None or current == previous:
            return True
        self.losses += 1
        self.lost.inc()
        self.lost_at.set(time.time())
        how = "is gone" if current is None else "was replaced (a stream worker found it gone and re-created it)"
        log.error("Redis at %s LOST ITS DATA (the marker %s %s): it restarted without persistence or was flushed. "
                  "Windows, arrival sequences and snapshots are gone, so scores use partial windows until "
                  "`velocity features rebuild` restores them from the archive and the offline store; run it now.",
                  self.where, self.key, how)
        return False

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.every_s)

    def start(self, client, prefix: str) -> None:
        """Poll `<prefix>:meta:instance` over `client` (an asyncio Redis client) until `stop`."""
        self.client, self.key = client, f"{prefix}:meta:instance"
        self.seen, self.checked = None, False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
