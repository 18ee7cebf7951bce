"""Where `velocity monitor` reads from: decisions on topic `scores`, labels in the offline label store, and the
drift reference of the current model (computed once from its training data and kept beside it)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from batch.monitor_quality import Decision, reference_bins

#: Written by `velocity monitor` beside the model (`<models>/<version>/`): the model's drift reference.
REFERENCE_FILE = "drift_reference.json"


class MonitorError(RuntimeError):
    """The monitor cannot run; the message says what is missing and what to do."""


def parse_decision(raw: bytes | None) -> Decision | None:
    """A record of topic `scores` (stream or API answer) as a Decision; None for anything else."""
    try:
        obj = orjson.loads(raw)
        if obj.get("source") not in ("stream", "api") or obj.get("decision") not in ("FRAUD", "NOT_FRAUD"):
            return None
        return Decision(txn_id=str(obj["txn_id"]), ts=int(obj["ts"]), fraud=obj["decision"] == "FRAUD",
                        score=float(obj.get("score") or 0.0), model_version=str(obj.get("model_version")),
                        source=obj["source"], features=dict(obj.get("features") or {}))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def read_decisions(bootstrap: str, topic: str, *, since_ms: int | None = None,
                   timeout_s: float = 120.0) -> tuple[list[Decision], int]:
    """Every decision on `topic` (from `since_ms` by message time, else from the start) up to its end as of the
    call, and the number of messages that were not decisions."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        from stores.kafka_security import kafka_python_kwargs  # SASL / TLS from VELOCITY_KAFKA_*
        from stores.kafka_topics import read_range

        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                 allow_auto_create_topics=False, request_timeout_ms=15_000, **kafka_python_kwargs())
    except KafkaError as exc:
        raise MonitorError(f"Kafka at {bootstrap} is not reachable ({type(exc).__name__}); is it running? "
                           "(`velocity services status`)") from None
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise MonitorError(f"topic {topic!r} does not exist at {bootstrap}: nothing has been scored yet")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = consumer.end_offsets(tps)
        starts = consumer.beginning_offsets(tps)
        if since_ms is not None:
            found = consumer.offsets_for_times({tp: since_ms for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
        try:
            values = read_range(consumer, starts, ends, timeout_s)
        except TimeoutError as exc:
            raise MonitorError(f"reading {topic} timed out after {timeout_s:.0f}s ({exc})") from None
        out: list[Decision] = []
        skipped = 0
        for value in values:
            d = parse_decision(value)
            if d is None:
                skipped += 1
            else:
                out.append(d)
        return out, skipped
    finally:
        consumer.close()


def known_labels(offline_dir: Path, as_of_ms: int) -> dict[str, int]:
    """txn_id -> its latest label with labeled_at <= as_of_ms (stores.labels' resolution rule)."""
    import duckdb

    from stores.labels import latest_labels_sql, read_labels

    con = duckdb.connect()
    try:
        con.register("label_versions", read_labels(offline_dir))
        rows = con.execute(latest_labels_sql("label_versions", str(int(as_of_ms)))).fetchall()
    finally:
        con.close()
    return {t: int(label) for t, label, _ in rows}


def current_model(models_dir: Path) -> tuple[str, Path, dict]:
    """(version, folder, metadata) of the current model (read as files: the booster is not needed here)."""
    try:
        version = (Path(models_dir) / "CURRENT").read_text().strip()
        folder = Path(models_dir) / version
        return version, folder, json.loads((folder / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise MonitorError(f"no current model under {models_dir} ({type(exc).__name__}): train one (`velocity "
                           "train`) or pass --models-dir") from None


def reference_from_frame(frame: pd.DataFrame, features: list[str]) -> dict[str, dict]:
    """Per feature, the reference bins of its training values (see batch.monitor_quality)."""
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise MonitorError(f"the training data has no column(s) {', '.join(missing)}")
    return {f: reference_bins(pd.to_numeric(frame[f], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
            for f in features}


def train_window(meta: dict) -> tuple[dt.date, dt.date]:
    """The model's training window (its train split when recorded, else the whole training window)."""
    split = meta.get("split") if isinstance(meta.get("split"), dict) else {}
    window = split.get("train") or [meta.get("training_window", {}).get("start"),
                                     meta.get("training_window", {}).get("end")]
    try:
        return dt.date.fromisoformat(str(window[0])), dt.date.fromisoformat(str(window[1]))
    except (TypeError, ValueError, IndexError):
        raise MonitorError("the current model's metadata records no training window; pass --training-set PATH "
                           "(the training data, Parquet)") from None


def load_reference(models_dir: Path, *, training_set: Path | None, offline_dir: Path, history: Path | None,
                   secret: str, rebuild: bool = False) -> tuple[str, dict[str, dict], str]:
    """(model version, per-feature reference, where it came from). Kept beside the model in REFERENCE_FILE once
    computed, from `training_set` (a Parquet frame) or else the training set of the model's train window rebuilt
    through DuckDB (over `history` or the stream's archive)."""
    version, folder, meta = current_model(models_dir)
    features = [str(f) for f in meta.get("features", [])]
    cached = folder / REFERENCE_FILE
    if cached.exists() and not rebuild and training_set is None:
        ref = json.loads(cached.read_text())
        return version, ref["features"], f"{cached} ({ref.get('source')})"
    if training_set is not None:
        try:
            frame = pd.read_parquet(training_set, columns=features)
        except Exception as exc:
            raise MonitorError(f"{training_set}: cannot read the training data ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None
        source = str(training_set)
    else:
        from batch.engines import build_training_set, open_engine

        start, end = train_window(meta)
        engine = open_engine("duckdb", offline_dir=offline_dir, history=history, secret=secret)
        try:
            frame = build_training_set(engine, start, end, None)
        except Exception as exc:
            raise MonitorError(f"cannot rebuild the training data of {start}..{end} ({' '.join(str(exc).split())[:300]}"
                               "); pass --training-set PATH or --history PATH") from None
        finally:
            engine.close()
        source = f"training set {start}..{end} rebuilt through DuckDB"
    ref = reference_from_frame(frame, features)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": version, "source": source, "features": ref}, indent=1))
    os.replace(tmp, cached)
    return version, ref, source
