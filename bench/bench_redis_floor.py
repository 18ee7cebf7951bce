"""What the stream's Redis ceiling can reach with the present layout: Redis CPU per event of the apply script against
the least any script on the same two keys per card can do.

The bare-loop ceiling (`bench.bench_stream`) is Redis time per event. The apply script makes three Redis calls for
a card's events of a batch (HMGET the state and txn records, ZADD the window members, HSET the records and state),
over two keys (`p:win:{card}`, `p:card:{card}`; `stores/lua/apply_events.lua`). `FLOOR_SCRIPT` below makes the same
three calls per event with the same key and value shapes and no logic at all (no lateness, no idempotency, no
retention, no TTL): no script on this layout can cost Redis less, so the two figures say how much the script's own
logic costs and how far the layout itself lets the ceiling go. Two more bound a one-key-per-card layout (the window
read from the card's hash): the same floor without the ZADD (two calls), and the apply script without its ZADD
(every other part of its logic kept; not a valid store). The ceiling's sizes: 100,000 events over 10,000 cards
(drawn at random), 50 ms apart, batches of 2,000; alternating runs, each over fresh keys.

    .venv/bin/python -m bench.bench_redis_floor [--events 100000 --rounds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import redis

from bench.bench_stream import redis_cpu_s
from featurestore.config import RedisSettings
from stores.redis_online import _script, apply_args, delete_prefix

#: The apply script's three calls per event, on its two keys, with values of its shapes; nothing else.
FLOOR_SCRIPT = """
local p, now = ARGV[1], ARGV[6]
local ev = cjson.decode(ARGV[7])
local call, out = redis.call, {}
for i = 1, #ev / 4 do
  local card, txn, ts, cents = ev[4 * i - 3], ev[4 * i - 2], ev[4 * i - 1], ev[4 * i]
  local hk, wk = p .. ':card:{' .. card .. '}', p .. ':win:{' .. card .. '}'
  call('HMGET', hk, '', txn)
  local head = now .. '|' .. cents .. '|A|'
  call('ZADD', wk, ts, head .. txn)
  call('HSET', hk, '', now .. '|' .. ts .. '|' .. ts .. '|', txn, head .. ts)
  out[2 * i - 1], out[2 * i] = 0, now
end
return out
"""


#: The least any layout can do that reads a card's state and idempotency records and writes them back: one key per
#: card, two calls (HMGET, HSET), no logic. A one-key layout (the window read from the hash) could not go below it.
FLOOR_TWO_CALLS_SCRIPT = FLOOR_SCRIPT.replace("  call('ZADD', wk, ts, head .. txn)\n", "")


def without_window_write(script: str) -> str:
    """The apply script minus its ZADD: not a valid store (no window members), but a bound on what a one-key
    layout keeping all of today's logic (lateness, idempotency, sequence numbers, retention, TTL) could reach."""
    cut = script.replace("many('ZADD', wk, zadd, nz)", "")
    if cut == script:
        raise SystemExit("the apply script's ZADD call moved: update bench_redis_floor.without_window_write")
    return cut


def run(client: redis.Redis, script: str, events: int, cards: int, batch: int = 2000) -> tuple[float, float]:
    """(events/s from a bare loop, Redis CPU us per event) of one script over fresh keys."""
    sha = client.script_load(script)
    prefix = f"floor:{uuid.uuid4().hex[:8]}"
    rng = random.Random(7)
    ids = [f"{c:032x}" for c in range(cards)]
    packed: list[str] = []
    for i in range(events):
        packed += (ids[rng.randrange(cards)], f"t{i}", str(1_600_000_000_000 + 50 * i), str(rng.randrange(100, 50_000)))
    try:
        cpu0, start = redis_cpu_s(client), time.perf_counter()
        for i in range(0, len(packed), 4 * batch):
            client.evalsha(sha, 0, *apply_args(prefix, packed[i:i + 4 * batch], 3_600_000, 86_400_000, 86_400))
        elapsed, cpu = time.perf_counter() - start, redis_cpu_s(client) - cpu0
    finally:
        delete_prefix(client, prefix)
    return events / elapsed, cpu / events * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each script")
    args = ap.parse_args(argv)
    client = redis.Redis(**RedisSettings().client_kwargs())
    apply = _script("apply_events.lua")
    scripts = {"apply script": apply, "floor (3 calls, no logic)": FLOOR_SCRIPT,
               "apply minus its ZADD": without_window_write(apply), "floor (2 calls, no logic)": FLOOR_TWO_CALLS_SCRIPT}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in scripts}
    for r in range(args.rounds):
        for name in (list(scripts) if r % 2 == 0 else list(scripts)[::-1]):
            runs[name].append(run(client, scripts[name], args.events, args.cards))
            tps, us = runs[name][-1]
            print(f"{name:27s} {tps:9,.0f} events/s  Redis CPU {us:5.1f} us/event", flush=True)
    for name, got in runs.items():
        print(f"median {name:20s} {statistics.median(t for t, _ in got):9,.0f} events/s  Redis CPU "
              f"{statistics.median(u for _, u in got):5.1f} us/event")
    client.close()


if __name__ == "__main__":
    main()
