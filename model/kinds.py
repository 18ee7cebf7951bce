"""Recall and AUC by fraud kind, from the generator's side file (`<history stem>.fraud_kinds.parquet`: txn_id, kind).

Card velocity sees a card chain; only a merchant's fraud rate sees a compromised merchant. One AUC-PR over all
fraud hides which kind a model misses, so the report breaks the test days down: for each kind, its fraud rows
against every legitimate row of the test days (AUC, AUC-PR) and the share of them flagged at the threshold.
Fraud rows the side file does not name (an analyst's label, a history from elsewhere) are kind `other`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OTHER = "other"
SUFFIX = ".fraud_kinds.parquet"


class FraudKindsError(ValueError):
    """The side file is missing or unreadable; the message names it."""


def default_path(history: Path | None) -> Path | None:
    """The side file `velocity generate` writes next to a history, if it is there."""
    if history is None:
        return None
    path = Path(history).with_name(Path(history).stem + SUFFIX)
    return path if path.is_file() else None


def read(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FraudKindsError(f"--fraud-kinds {path}: no such file (`velocity generate` writes it next to the "
                              f"history as <stem>{SUFFIX})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise FraudKindsError(f"--fraud-kinds {path}: cannot be read as Parquet ({' '.join(str(exc).split())[:200]})"
                              ) from None
    missing = [c for c in ("txn_id", "kind") if c not in table.column_names]
    if missing:
        raise FraudKindsError(f"--fraud-kinds {path}: no column {', '.join(missing)} (expected txn_id, kind)")
    return table.select(["txn_id", "kind"]).cast(pa.schema([("txn_id", pa.string()), ("kind", pa.string())]))


def kinds_of(txn_id: pa.Array, y: np.ndarray, kinds: pa.Table) -> np.ndarray:
    """Per row: its kind for fraud rows (OTHER when the side file does not name it), "" for legitimate rows."""
    idx = pc.index_in(txn_id, value_set=kinds.column("txn_id").combine_chunks())
    names = pc.fill_null(kinds.column("kind").combine_chunks().take(idx), OTHER).to_numpy(zero_copy_only=False)
    return np.where(np.asarray(y) == 1, names.astype(object), "")


def breakdown(y: np.ndarray, scores: np.ndarray, threshold: float, kind: np.ndarray) -> dict[str, dict]:
    """{kind: {frauds, recall_at_threshold, roc_auc, aucpr}}: each kind's fraud rows against all legitimate rows."""
    from model.metrics import ranking_metrics

    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    legit = y == 0
    out = {}
    for name in sorted({k for k in kind[y == 1]}):
        fraud = (y == 1) & (kind == name)
        rows = legit | fraud
        yk, sk = fraud[rows].astype(np.int8), scores[rows]
        both = legit.any()
        aucpr, roc_auc = ranking_metrics(yk, sk)
        out[name] = {"frauds": int(fraud.sum()), "recall_at_threshold": float(np.mean(scores[fraud] >= threshold)),
                     "roc_auc": roc_auc if both else float("nan"), "aucpr": aucpr if both else float("nan")}
    return out
