"""Stream throughput with scoring on (SPEC section 10, issue 14): `stream_tps_with_scoring`, beside the same run's
throughput with scoring off.

    .venv/bin/python -m bench.bench_stream_scoring [--events 200000] [--models-dir DIR] [--rounds 1]

Pre-produces N transactions (`bench.bench_stream.messages`: 10,000 cards, as Velocity's producers send them) to one
4-partition topic, then runs one `velocity stream` worker at a time over it, each a fresh consumer group with its
own Redis key prefix and archive: `--no-score` (aggregation and archive only: the reference) and `--score` (the
same, then every transaction scored with the current model of --models-dir, answers produced to a bench `scores`
topic and FRAUD decisions to a bench `alerts` topic). Throughput is timed from a worker's first processed event to
its last, as `bench.bench_stream` does; each run also gives the worker's CPU per event. With --rounds > 1 the two
modes alternate (off, on, on, off, ...) so that drift in the machine's speed falls on both. Scoring on, an event
counts once its answer is produced (`velocity_stream_scored_total`), not when its window update is done.

Records the median scoring-on throughput as `stream_tps_with_scoring` in bench/results.json (the scoring-off
figure is printed beside it, not recorded: `stream_tps` belongs to `bench.bench_stream`).

`--reference DIR` (an A/B on a shared machine): DIR holds another copy of the code (e.g. the last commit's files:
`git show HEAD:path`), run as a third mode, scoring on, alternating with the others (off, on, ref, ref, on, off,
...); the ratio on/ref is printed, with the load average, and nothing is recorded. Every card has a published
nightly snapshot (`card_agg_1w`, 7 days before the first event) in the run's key prefix, as in production, so
each score reads one.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import redis

from bench.bench_serve import choose_models_dir
from bench.bench_stream import (
    BOOT,
    REPO,
    SECRET,
    load_average,
    messages,
    metric,
    process_cpu_s,
    producer,
    redis_cpu_s,
    start_worker,
    wait_metrics,
)
from bench.results import update
from featurestore.config import RedisSettings
from featurestore.entity import EntityKeyer
from stores.kafka_topics import ensure_topics

T0 = 1_600_000_000_000  # the first event's time (bench.bench_stream.messages: 50 ms apart)


def publish_night(prefix: str, cards: int, t0: int) -> None:
    """A nightly snapshot of every declared batch group, cut-off the midnight before t0, published on time: every
    card's statistics, and the merchant's (`bench.bench_stream.messages` sends merchant "m")."""
    from featurestore.config import RedisSettings
    from featurestore.definitions import DAY_MS, REGISTRY
    from stores.redis_online import OnlineStore

    keyer = EntityKeyer(SECRET)
    store = OnlineStore(RedisSettings(), prefix=prefix)
    try:
        cutoff = t0 - t0 % DAY_MS
        keys = [keyer(f"4{i:015d}") for i in range(cards)]
        stats = [{"n": 20 + i % 50, "s": 100_000 + 37 * i, "mn": 500, "mx": 90_000, "f": i % 3} for i in range(cards)]
        rows = {g.name: list(zip(keys, stats, strict=True)) if g.entity == "card" else [("m", stats[0])]
                for g in REGISTRY.batch_groups}
        store.write_snapshot(cutoff, rows, published_ms=cutoff)
    finally:
        store.close()


def run_worker(topic: str, run: str, port: int, events: int, score: bool, models, scores: str, alerts: str,
               cards: int = 10_000, code=None) -> dict:
    """One worker over the whole topic (a new group and key prefix): events/s and CPU per event."""
    prefix = f"bench:scoring:{run}"
    offline = REPO / "bench" / "out" / f"stream-scoring-{run}"
    offline.mkdir(parents=True, exist_ok=True)
    extra = (["--score", "--models-dir", str(models), "--scores-topic", scores, "--alerts-topic", alerts] if score
             else ["--no-score"])
    publish_night(prefix, cards, T0)
    worker = start_worker(topic, prefix, port, offline, ["--group", f"bench-scoring-{run}", *extra], code=code)
    client = redis.Redis(**RedisSettings().client_kwargs())
    try:
        wait_metrics(port)
        first = None
        deadline = time.monotonic() + 900
        # Scoring on, a transaction counts once its answer is produced (a batch is scored after its window update).
        counter = "velocity_stream_scored_total" if score else "velocity_stream_events_total"
        while True:
            n = metric(port, counter)
            now = time.perf_counter()
            if n > 0 and first is None:
                first, n_first, cpu_first = now, n, process_cpu_s(worker.pid)
                redis_first = redis_cpu_s(client)
            if n >= events:
                break
            if worker.poll() is not None:
                raise SystemExit(f"worker died; see {offline / 'worker.log'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"worker stalled at {n:,.0f} events")
            time.sleep(0.25)  # scraping /metrics costs the worker CPU: do not poll it hard
        cpu = process_cpu_s(worker.pid) - cpu_first
        done = max(events - n_first, 1)
        # Redis's CPU over the same span (the server is shared: other clients' work counts too).
        out = {"tps": (events - n_first) / (now - first), "cpu_us": cpu / done * 1e6,
               "redis_us": (redis_cpu_s(client) - redis_first) / done * 1e6}
        if score:  # the answers are produced before a batch is acked: all of them by now
            out["scored"] = metric(port, "velocity_stream_scored_total")
            out["unscored"] = metric(port, "velocity_stream_unscored_total")
            out["alerts"] = metric(port, "velocity_stream_alerts_total")
        return out
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        client.close()
        _drop_prefix(prefix)
        shutil.rmtree(offline / "archive", ignore_errors=True)  # worker.log stays for a look afterwards


def _drop_prefix(prefix: str) -> None:
    import redis

    from featurestore.config import RedisSettings
    from stores.redis_online import delete_prefix

    client = redis.Redis(**RedisSettings().client_kwargs())
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=1, help="Runs of each mode, alternating (off, on, on, off, ...).")
    ap.add_argument("--models-dir", help="Score with this model directory's current model (default: the current "
                    "model of $VELOCITY_DATA_DIR/models, else the one bench.bench_model trained).")
    ap.add_argument("--port", type=int, default=9481)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--reference", help="A/B: also run this copy of the code, scoring on (nothing is recorded).")
    args = ap.parse_args()
    models = choose_models_dir(args.models_dir, synthetic=False)
    if models is None:
        raise SystemExit("no current model: train one (`velocity train`, or `python -m bench.bench_model`) or pass "
                         "--models-dir")

    tag = uuid.uuid4().hex[:8]
    topic, scores, alerts = f"bench.scoring.{tag}", f"bench.scoring.{tag}.scores", f"bench.scoring.{tag}.alerts"
    ensure_topics(BOOT, {topic: 4, f"{topic}.dlq": 4, scores: 4, alerts: 4})
    print(f"model: {models}; load average {load_average()}", flush=True)
    print(f"producing {args.events:,} events to {topic} ...", flush=True)
    prod = producer()
    for k, v, ts in messages(args.events, args.cards, T0, EntityKeyer(SECRET)):
        prod.send(topic, key=k, value=v, timestamp_ms=ts)
    prod.flush()
    prod.close()

    modes = [False, True, "ref"] if args.reference else [False, True]
    order = []
    for r in range(args.rounds):
        order += modes if r % 2 == 0 else modes[::-1]
    results: dict = {m: [] for m in modes}
    try:
        for i, mode in enumerate(order):
            score = bool(mode)
            code = Path(args.reference).resolve() if mode == "ref" else None
            got = run_worker(topic, f"{tag}-{i}", args.port, args.events, score, models, scores, alerts,
                             args.cards, code)
            results[mode].append(got)
            extra = (f"; scored {got['scored']:,.0f} (unscored {got['unscored']:,.0f}), alerts {got['alerts']:,.0f}"
                     if score else "")
            name = "reference on" if mode == "ref" else f"scoring {'on ' if score else 'off'}"
            print(f"{name}: {got['tps']:,.0f} events/s, worker CPU {got['cpu_us']:.0f} us/event, Redis CPU "
                  f"{got['redis_us']:.0f} us/event (load average {load_average()}){extra}", flush=True)
            if score and got["scored"] < args.events:
                raise SystemExit(f"only {got['scored']:,.0f} of {args.events:,} events were scored: see the "
                                 "worker log under bench/out/")
    finally:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=BOOT)
        with contextlib.suppress(Exception):
            admin.delete_topics([topic, f"{topic}.dlq", scores, alerts])
        admin.close()

    on = statistics.median(r["tps"] for r in results[True])
    off = statistics.median(r["tps"] for r in results[False])
    print(f"\nstream throughput, one worker, {args.events:,} events over {args.cards:,} cards: scoring on {on:,.0f} "
          f"events/s, scoring off {off:,.0f} events/s in the same run ({on / off:.2f}x)")
    if args.reference:
        ref = statistics.median(r["tps"] for r in results["ref"])
        cpu = statistics.median(r["cpu_us"] for r in results[True])
        ref_cpu = statistics.median(r["cpu_us"] for r in results["ref"])
        rcpu = statistics.median(r["redis_us"] for r in results[True])
        ref_rcpu = statistics.median(r["redis_us"] for r in results["ref"])
        print(f"A/B: scoring on {on:,.0f} events/s vs the reference {ref:,.0f} ({on / ref:.2f}x); worker CPU "
              f"{cpu:.0f} vs {ref_cpu:.0f} us/event, Redis CPU {rcpu:.0f} vs {ref_rcpu:.0f} us/event; load "
              f"average now {load_average()}")
        return
    if not args.no_record:
        update(stream_tps_with_scoring=round(on))
        print("recorded stream_tps_with_scoring in bench/results.json")


if __name__ == "__main__":
    main()
