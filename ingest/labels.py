"""Which labels a replay emits, and when (`velocity replay --labels`).

A fraud label is known days or weeks after its transaction. The replay sends a label once its event-time clock
passes the label's `labeled_at`, interleaved with the transactions (`schedule`):

- a history with a `labeled_at` column (nullable int64 epoch ms; null = never labeled) gives each label's time,
  and its `fraud_label` column the verdict; every row with a `labeled_at` is labeled, legitimate ones included;
- otherwise each fraud row (`fraud_label` = 1) gets a delay drawn from a log-normal distribution (`LabelDelay`:
  median a few days, most within 1-14 days, a tail capped at `max_days`), reproducible from the seed. Legitimate
  rows get no label: nobody confirms a legitimate payment; an unlabeled transaction is presumed legitimate.

A label that would be more than the worker's future bound ahead of now is not yet known and is held back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.definitions import DEFAULT_MAX_FUTURE_MS
from featurestore.entity import redact_pans
from featurestore.events import Keyer
from featurestore.label_events import label_message

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


class LabelPlanError(ValueError):
    """The history cannot give labels; the message says why."""


@dataclass(frozen=True)
class LabelDelay:
    """Delay from a fraud transaction to its label: log-normal, clipped to [min_hours, max_days].

    With the defaults (median 5 days, spread 0.8) about 88% of labels arrive within 1-14 days, about 1% after
    30 days, and none after 60.
    """

    median_days: float = 5.0
    spread: float = 0.8  # sigma of the log-normal: larger, a longer tail
    max_days: float = 60.0
    min_hours: float = 1.0
    seed: int = 42

    def validate(self) -> None:
        if not self.median_days > 0:
            raise LabelPlanError(f"--label-delay-median-days must be > 0, got {self.median_days}")
        if not self.spread >= 0:
            raise LabelPlanError(f"--label-delay-spread must be >= 0, got {self.spread}")
        if not self.max_days * 24 >= self.min_hours or self.max_days <= 0:
            raise LabelPlanError(f"--label-delay-max-days must be > 0 and at least {self.min_hours:g} h, "
                                 f"got {self.max_days}")

    def draw(self, n: int) -> np.ndarray:
        """n delays in ms, reproducible from the seed."""
        rng = np.random.default_rng(self.seed)
        days = rng.lognormal(np.log(self.median_days), self.spread, size=n)
        ms = np.clip(days * DAY_MS, self.min_hours * HOUR_MS, self.max_days * DAY_MS)
        return ms.astype(np.int64)


@dataclass
class LabelPlan:
    """Labels of a history: the row each is about, when it becomes known, the verdict, in row order."""

    rows: np.ndarray
    labeled_at: np.ndarray
    fraud_label: np.ndarray
    held_back: int = 0  # labels not yet known (beyond the future bound)

    def __len__(self) -> int:
        return int(self.rows.size)


def plan_labels(table: pa.Table, delay: LabelDelay, *, now_ms: int,
                max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> LabelPlan:
    """The labels a replay of `table` emits (see the module docstring); every row of the table is planned, so a
    replay of a range gets the same labels for its rows as a full replay."""
    names = table.column_names
    if "fraud_label" not in names:
        raise LabelPlanError("--labels needs a fraud_label column (0/1) in the history")
    label = np.asarray(pc.fill_null(table.column("fraud_label"), 0).to_numpy(zero_copy_only=False)).astype(np.int8)
    ts = table.column("ts").to_numpy(zero_copy_only=False).astype(np.int64)
    if "labeled_at" in names:
        col = table.column("labeled_at")
        if pa.types.is_null(col.type):  # a CSV column left empty: nothing labeled
            col = pa.chunked_array([pa.nulls(table.num_rows, pa.int64())])
        if not pa.types.is_integer(col.type):
            raise LabelPlanError(f"column labeled_at must be integer epoch ms (null = never labeled), found {col.type}")
        valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(valid)
        at = np.asarray(pc.fill_null(col, 0).to_numpy(zero_copy_only=False)).astype(np.int64)[rows]
    else:
        rows = np.flatnonzero(label == 1)
        delay.validate()
        at = ts[rows] + delay.draw(rows.size)
    due = at <= now_ms + max_future_ms
    return LabelPlan(rows[due], at[due], label[rows][due], held_back=int((~due).sum()))


def encode_labels(table: pa.Table, plan: LabelPlan, pick: np.ndarray, keyer: Keyer) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of the planned labels at positions `pick`, txn_id masked as the transaction's (so they join)."""
    ids = table.column("txn_id").take(pa.array(plan.rows[pick])).to_pylist()
    keys, values = [], []
    for txn_id, label, at in zip(ids, plan.fraud_label[pick].tolist(), plan.labeled_at[pick].tolist(), strict=True):
        k, v = label_message({"txn_id": redact_pans(txn_id, keyer), "fraud_label": int(label), "labeled_at": int(at)})
        keys.append(k)
        values.append(v)
    return keys, values


def schedule(rows: np.ndarray, ts: np.ndarray, plan: LabelPlan) -> tuple[np.ndarray, np.ndarray]:
    """For one producer's rows (in send order): which planned labels it sends, and after which of its rows.

    Returns (positions into `plan`, due) sorted by send time: label i goes out right after the producer's row at
    position due[i], the first row at which its event-time clock (the largest ts sent so far) reaches the label's
    `labeled_at`, and never before the labeled transaction itself. due = len(rows): after the last row.
    """
    if not len(plan) or not rows.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    at = np.searchsorted(sorted_rows, plan.rows)
    inside = (at < rows.size) & (sorted_rows[np.minimum(at, rows.size - 1)] == plan.rows)
    pick = np.flatnonzero(inside)
    txn_pos = order[at[pick]]
    clock = np.maximum.accumulate(ts[rows])
    clock_pos = np.searchsorted(clock, plan.labeled_at[pick], side="left")
    due = np.maximum(txn_pos, clock_pos)
    by_time = np.lexsort((plan.labeled_at[pick], due))
    return pick[by_time], due[by_time]
