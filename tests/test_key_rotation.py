"""Entity-key rotation end to end (issue 17, section 3) on the real Redis, a real API process and an offline store:
before the rotation a card's features live under its version-1 key; during it (two versions configured) a score
given the PAN finds that state; `velocity features rotate-key` moves the online and offline stores to version 2 with
the same features and nothing left under version 1; a key of an unknown version is refused clearly."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import synthetic
from tests.api_harness import SECRET, isolated_api
from tests.conftest import REPO

NEW = "rotated-secret-for-tests"
ARRIVED_US = 1_764_000_000_000_000
DAY = 86_400_000


def key_v1(pan: str) -> str:
    return hmac.new(SECRET.encode(), pan.encode(), hashlib.sha256).hexdigest()[:32]


def key_v2(pan: str) -> str:
    return "k2." + hmac.new(NEW.encode(), pan.encode(), hashlib.sha256).hexdigest()[:32]


def write_archive(rows: list[dict], offline: os.PathLike) -> None:
    """The stream's archive for `rows` (in order, none late), keyed by version 1 as before any rotation."""
    from stores.archive import ARCHIVE_SCHEMA

    recs = [{"txn_id": r["txn_id"], "card": key_v1(r["cc_num"]), "pan_last4": r["cc_num"][-4:], "amount": r["amount"],
             "amount_cents": round(r["amount"] * 100), "ts": r["ts"], "merchant": r["merchant"],
             "category": r["category"], "fraud_label": r["fraud_label"], "late": False, "seq": ARRIVED_US + i,
             "partition": 0, "offset": i, "archived_ms": ARRIVED_US // 1000 + i} for i, r in enumerate(rows)]
    day = offline / "archive" / "date=2020-01-01"
    day.mkdir(parents=True)
    table = pa.Table.from_pylist(recs, schema=ARCHIVE_SCHEMA)
    pq.write_table(table.slice(0, len(recs) // 2), day / "part-a.parquet", compression="zstd")
    pq.write_table(table.slice(len(recs) // 2), day / "part-b.parquet", compression="zstd")


def velocity(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velocity_cli", *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, **env})


def same(a, b) -> bool:
    a = math.nan if a is None else a
    b = math.nan if b is None else b
    return (math.isnan(a) and math.isnan(b)) or a == b


def score(client, pan: str, txn_id: str, ts: int) -> dict:
    r = client.post("/v1/score?publish=false", json={"txn_id": txn_id, "cc_num": pan, "amount": 12.34, "ts": ts,
                                                     "merchant": "m-1", "category": "grocery"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.integration
@pytest.mark.e2e
def test_rotate_key_moves_online_and_offline_stores_and_reads_both_versions_meanwhile(
        services, kafka_admin, redis_settings, tmp_path):
    from batch.engines import open_engine, run_snapshots
    from featurestore.state import EventWrite
    from stores.offline_files import read_snapshots
    from stores.redis_cluster_store import sync_client
    from stores.redis_online import OnlineStore

    rows = synthetic.history(n=500, cards=6, seed=23, disorder=0, late=0, mean_gap_ms=600_000)
    pans = sorted({r["cc_num"] for r in rows})
    pan, fresh_pan = pans[0], synthetic.luhn_pan(np.random.default_rng(99))
    with isolated_api(services, kafka_admin, tmp_path, "rotate", env={"VELOCITY_ENTITY_SECRETS": f"2:{NEW}"}) as api:
        client, env, offline = api["client"], api["env"], tmp_path / "offline"
        store = OnlineStore(redis_settings, prefix=api["prefix"])
        # ---- before: the stores as written with version 1 (archive, nightly snapshots offline and online, windows)
        write_archive(rows, offline)
        first = dt.datetime.fromtimestamp(rows[0]["ts"] / 1000, dt.UTC).date() + dt.timedelta(days=1)
        last = dt.datetime.fromtimestamp(rows[-1]["ts"] / 1000, dt.UTC).date()
        days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
        eng = open_engine("duckdb", offline_dir=offline, history=None, secret=SECRET)
        run_snapshots(eng, days, offline_dir=offline, online=store, quality=None)
        start, end = rows[0]["ts"] - DAY, rows[-1]["ts"] + DAY
        train_before = eng.training_set(start, end)
        eng.close()
        t = int(time.time() * 1000) - 60_000
        store.apply_events([EventWrite(key_v1(pan), f"w{i}", t - i * 60_000, 1000 + i) for i in range(1, 6)])
        before = store.read_features(key_v1(pan), "probe", t, 1234)
        assert before.num_trans_last_10m == 6 and before.num_trans_last_1w > 0

        # ---- during: version 2 signs, the card's state is still under version 1, and a score finds it there
        during = score(client, pan, "d-1", t)
        assert during["card"] == key_v1(pan)
        assert during["features"]["num_trans_last_10m"] == 6
        assert same(during["features"]["num_trans_last_1w"], before.num_trans_last_1w)
        assert score(client, fresh_pan, "d-2", t)["card"] == key_v2(fresh_pan)  # a card never seen: version 2

        pans_file = tmp_path / "cards.txt"
        pans_file.write_text("\n".join([*pans, "not-a-card"]) + "\n")
        dry = velocity(env, "features", "rotate-key", "--from", "1", "--to", "2", "--pans", str(pans_file), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would move 1 cards" in dry.stdout and "1 entries of --pans are not card numbers" in dry.stderr
        assert store.card_state(key_v1(pan)) and not store.card_state(key_v2(pan))  # a dry run changes nothing
        assert set(pq.read_table(offline / "archive").column("card").to_pylist()) == {key_v1(p) for p in pans}

        run = velocity(env, "features", "rotate-key", "--from", "1", "--to", "2", "--pans", str(pans_file))
        assert run.returncode == 0, run.stderr
        assert "online: moved 1 cards (5 window events)" in run.stdout, run.stdout
        assert not any(p in run.stdout + run.stderr for p in pans)  # never a card number in the output
        again = velocity(env, "features", "rotate-key", "--from", "1", "--to", "2", "--pans", "-",
                         stdin="\n".join(pans))
        assert again.returncode == 0, again.stderr
        assert "moved 0 cards (0 window events), 0 snapshot hashes" in again.stdout  # idempotent
        assert "moved 0 rows in 0 of" in again.stdout

        # ---- after: the same features under version 2, nothing under version 1
        after = store.read_features(key_v2(pan), "probe", t, 1234)
        assert all(same(after.values[k], v) for k, v in before.values.items()), (after.values, before.values)
        assert after.snapshot_cutoff_ms == before.snapshot_cutoff_ms and after.complete
        raw = sync_client(redis_settings)  # every master's keys, under Redis Cluster too
        names = [k.decode() for k in raw.scan_iter(match=f"{api['prefix']}:*", count=1000)]
        raw.close()
        assert not [n for n in names for p in pans if key_v1(p) in n]
        assert any(key_v2(pan) in n for n in names)
        assert score(client, pan, "a-1", t)["features"]["num_trans_last_10m"] == 6
        by_key = client.get(f"/v1/features/{key_v2(pan)}")
        assert by_key.status_code == 200 and same(by_key.json()["features"]["num_trans_last_1w"],
                                                  before.num_trans_last_1w)
        unknown = client.get("/v1/features/k9." + "0" * 32)
        assert unknown.status_code == 422 and unknown.json()["reason"] == "unknown_key_version"
        assert "entity-key version 9 is not configured (known: 1, 2)" in unknown.json()["detail"]
        # ... offline: archive and snapshots carry version 2, and the training set is the same rows, re-keyed
        assert set(pq.read_table(offline / "archive").column("card").to_pylist()) == {key_v2(p) for p in pans}
        assert all(set(pq.read_table(p).column("card").to_pylist()) <= {key_v2(x) for x in pans}
                   for p in read_snapshots(offline))
        eng = open_engine("duckdb", offline_dir=offline, history=None, secret=SECRET)
        train_after = eng.training_set(start, end)
        eng.close()
        rekeyed = train_before.assign(card=train_before["card"].map({key_v1(p): key_v2(p) for p in pans}))
        pd.testing.assert_frame_equal(rekeyed.sort_values("txn_id").reset_index(drop=True),
                                      train_after.sort_values("txn_id").reset_index(drop=True))
        assert (train_after["card"] == key_v2(pan)).sum() == sum(r["cc_num"] == pan for r in rows)
        # ---- a version not configured is one clear line
        bad = velocity(env, "features", "rotate-key", "--from", "2", "--to", "9", "--pans", str(pans_file))
        assert bad.returncode == 2 and "entity-key version 9 is not configured" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        got = velocity(env, "features", "get", "k9." + "0" * 32)
        assert got.returncode == 2 and "version 9 is not configured" in got.stderr
        store.close()


@pytest.mark.integration
def test_rekey_merges_with_state_already_under_the_new_key_and_never_drops_a_concurrent_write(online_store):
    """Events that reached the new key before the run (replay already signing with version 2) are merged with the
    old key's, each txn_id once; a write reaching the old key between the copy and the delete keeps the old keys."""
    from featurestore.state import EventWrite
    from stores.rekey_online import _DROP_IF_UNCHANGED, rekey_online

    pan = "4539578763621486"
    old, new = key_v1(pan), key_v2(pan)
    t = int(time.time() * 1000) - 60_000
    online_store.apply_events([EventWrite(old, f"e{i}", t - i * 60_000, 100 * i) for i in (1, 2, 3)])
    online_store.apply_events([EventWrite(new, "e2", t - 2 * 60_000, 200), EventWrite(new, "e4", t - 30_000, 400)])
    stats = rekey_online(online_store, [(old, new)])
    assert (stats.cards_moved, stats.events_copied) == (1, 2)  # e1, e3: e2 was already there
    f = online_store.read_features(new, "probe", t, 1000)
    assert f.num_trans_last_10m == 5 and f.sum_cents_last_10m == 100 + 200 + 300 + 400 + 1000
    assert not online_store.card_state(old) and not online_store.redis.exists(online_store.keys.window(old))
    # A straggler under the old key (a transaction in flight during the run) is moved by the rerun.
    online_store.apply_events([EventWrite(old, "e5", t - 10_000, 500)])
    assert rekey_online(online_store, [(old, new)]).cards_moved == 1
    assert online_store.read_features(new, "probe", t, 1000).num_trans_last_10m == 6
    assert rekey_online(online_store, [(old, new)]).cards_moved == 0
    # The delete is conditional: state read before a concurrent write no longer matches, nothing is deleted.
    online_store.apply_events([EventWrite(old, "e6", t - 5_000, 600)])
    stale = online_store.redis.hget(online_store.keys.card(old), "").decode()
    online_store.apply_events([EventWrite(old, "e7", t - 4_000, 700)])
    keys = (online_store.keys.card(old), online_store.keys.window(old))
    assert online_store.redis.eval(_DROP_IF_UNCHANGED, 2, *keys, stale) == 0
    assert online_store.redis.exists(*keys) == 2
