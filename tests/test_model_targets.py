"""The model's target and its by-kind report (issue 16, item 6).

The target is the latest label known when training runs: of a transaction's label versions, the one with the
latest `labeled_at` <= the training time (a fraud label wins a tie); a transaction with no version known by then
keeps its inline `fraud_label`. Expectations are written out by hand from those words.
"""

from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import kinds, report, targets
from stores.labels import LABELS_SCHEMA, write_labels

DAY_MS = 86_400_000
T0 = 1_600_000_000_000  # the transactions' time; labels come days later
NOW = T0 + 30 * DAY_MS  # when training runs


def _versions(*rows: tuple[str, int, int]) -> pa.Table:
    return pa.Table.from_pylist([{"txn_id": t, "fraud_label": f, "labeled_at": at} for t, f, at in rows],
                                schema=LABELS_SCHEMA)


TXN = pa.array(["a", "b", "c", "d", "e", "f"], pa.string())
INLINE = np.array([1, 1, 0, 1, 0, np.nan])


@pytest.mark.unit
def test_a_relabel_to_legitimate_known_before_training_changes_the_target() -> None:
    v = _versions(("a", 1, T0 + 3 * DAY_MS), ("a", 0, T0 + 10 * DAY_MS))  # a chargeback, then reversed
    y, t = targets.apply(TXN, INLINE, v, NOW)
    assert y[0] == 0
    assert list(y[1:5]) == [1, 0, 1, 0] and np.isnan(y[5])  # no version: the inline label (or none)
    assert (t.from_labels, t.changed, t.from_inline, t.versions, t.versions_after) == (1, 1, 4, 2, 0)


@pytest.mark.unit
def test_a_label_known_only_after_training_time_does_not_count() -> None:
    v = _versions(("a", 1, T0 + 3 * DAY_MS), ("a", 0, NOW + 1),  # re-labeled a millisecond too late
                  ("c", 1, NOW + 5 * DAY_MS))  # a late chargeback of a row labeled 0 inline
    y, t = targets.apply(TXN, INLINE, v, NOW)
    assert y[0] == 1 and y[2] == 0
    assert t.versions_after == 2
    y_later, _ = targets.apply(TXN, INLINE, v, NOW + 5 * DAY_MS)  # trained later, both are known
    assert y_later[0] == 0 and y_later[2] == 1


@pytest.mark.unit
def test_fraud_wins_a_tie_and_a_label_can_decide_a_row_without_an_inline_one() -> None:
    v = _versions(("b", 0, T0 + DAY_MS), ("b", 1, T0 + DAY_MS), ("f", 1, T0 + 2 * DAY_MS))
    y, t = targets.apply(TXN, INLINE, v, NOW)
    assert y[1] == 1 and y[5] == 1
    assert t.from_labels == 2 and t.from_inline == 4


@pytest.mark.unit
def test_label_versions_come_from_the_label_store_and_the_history_column(tmp_path) -> None:
    offline = tmp_path / "offline"
    write_labels(offline, [{"txn_id": "a", "fraud_label": 0, "labeled_at": T0 + 9 * DAY_MS}])
    history = tmp_path / "h.parquet"
    pq.write_table(pa.table({"txn_id": ["a", "b", "c"], "fraud_label": pa.array([1, 1, 0], pa.int8()),
                             "labeled_at": pa.array([T0 + 2 * DAY_MS, T0 + 40 * DAY_MS, None], pa.int64())}), history)
    v, sources = targets.label_versions(offline, history)
    assert sorted(zip(v.column("txn_id").to_pylist(), v.column("fraud_label").to_pylist(), strict=True)) == [
        ("a", 0), ("a", 1), ("b", 1)]
    assert len(sources) == 2
    y, t = targets.apply(pa.array(["a", "b", "c"]), np.array([1.0, 1.0, 0.0]), v, NOW, sources)
    assert list(y) == [0, 1, 0]  # a: the store's later re-label; b: labeled after NOW, inline kept
    assert "the label store" in t.describe() and "labeled_at" in t.describe()
    none, no_sources = targets.label_versions(tmp_path / "nothing", None)
    assert none.num_rows == 0 and no_sources == []


@pytest.mark.unit
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_history_with_labeled_at_but_no_fraud_label_is_one_clear_error(tmp_path, suffix) -> None:
    """labeled_at dates a label; without fraud_label there is nothing it dates: refused by the history reader and
    by the trainer's label reader, naming both columns, rather than guessing a label."""
    from pyarrow import csv as pacsv

    from stores.history import HistoryError, load_history

    history = tmp_path / f"h{suffix}"
    table = pa.table({"txn_id": ["a", "b"], "cc_num": ["4111111111111111"] * 2, "amount": [1.5, 2.0],
                      "ts": pa.array([T0, T0 + 1], pa.int64()), "merchant": ["m", "m"], "category": ["c", "c"],
                      "labeled_at": pa.array([T0 + DAY_MS, None], pa.int64())})
    (pq.write_table if suffix == ".parquet" else pacsv.write_csv)(table, history)
    for read in (load_history, lambda p: targets.label_versions(None, p)):
        with pytest.raises(HistoryError, match="labeled_at column but no fraud_label") as err:
            read(history)
        assert "\n" not in str(err.value) and str(history) in str(err.value)
    # without labeled_at, an unlabeled history is still fine to read (replay, features), with no label versions
    pq.write_table(table.drop(["labeled_at"]), tmp_path / "plain.parquet")
    assert load_history(tmp_path / "plain.parquet").num_rows == 2
    assert targets.label_versions(None, tmp_path / "plain.parquet")[0].num_rows == 0


# ------------------------------------------------------------------ by fraud kind


def _ranking():
    """100 legitimate rows scored 0.00 .. 0.99; 4 chain frauds above all of them; 2 compromised-merchant frauds,
    one above every legitimate row and one below; 1 fraud the side file does not name, at 0.5."""
    legit = np.arange(100) / 100
    y = np.r_[np.zeros(100), np.ones(7)].astype(np.int8)
    scores = np.r_[legit, [1.2, 1.3, 1.4, 1.5], [1.1, -1.0], [0.505]]
    txn = pa.array([f"t{i}" for i in range(107)])
    side = pa.table({"txn_id": [f"t{i}" for i in range(100, 106)],
                     "kind": ["card_chain"] * 4 + ["compromised_merchant"] * 2})
    return y, scores, txn, side


@pytest.mark.unit
def test_by_kind_figures_are_each_kind_against_all_legitimate_rows() -> None:
    y, scores, txn, side = _ranking()
    kind = kinds.kinds_of(txn, y, side)
    assert list(kind[98:]) == ["", "", *["card_chain"] * 4, *["compromised_merchant"] * 2, "other"]
    out = kinds.breakdown(y, scores, 0.995, kind)
    assert set(out) == {"card_chain", "compromised_merchant", "other"}
    assert out["card_chain"] == {"frauds": 4, "recall_at_threshold": 1.0, "roc_auc": 1.0, "aucpr": 1.0}
    comp = out["compromised_merchant"]
    assert comp["frauds"] == 2 and comp["recall_at_threshold"] == 0.5
    assert comp["roc_auc"] == pytest.approx(0.5)  # one above all 100, one below all 100
    # precision 1 at the first, 2/102 at the second: AP = (1 + 2/102) / 2
    assert comp["aucpr"] == pytest.approx((1 + 2 / 102) / 2)
    assert out["other"]["roc_auc"] == pytest.approx(0.51) and out["other"]["recall_at_threshold"] == 0.0


@pytest.mark.unit
def test_report_shows_the_by_kind_table_or_says_why_not() -> None:
    y, scores, txn, side = _ranking()
    kind = kinds.kinds_of(txn, y, side)
    by_kind = {"source": "h.fraud_kinds.parquet",
               "models": {"model": kinds.breakdown(y, scores, 0.995, kind),
                          "no_merchant": kinds.breakdown(y, -scores, 0.995, kind)}}
    lines = report._by_kind(types.SimpleNamespace(by_kind=by_kind))
    text = "\n".join(lines)
    assert "### By fraud kind" in text and "h.fraud_kinds.parquet" in text
    rows = [ln for ln in lines if ln.startswith("| compromised_merchant")]
    assert len(rows) == 2 and "**model**" in rows[0] and "no merchant features" in rows[1]
    assert "| 2 | 50.0% | 0.5000 |" in rows[0]
    assert "no breakdown by kind" in "\n".join(report._by_kind(types.SimpleNamespace(by_kind=None)))


@pytest.mark.unit
def test_a_missing_or_wrong_side_file_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(kinds.FraudKindsError, match="no such file"):
        kinds.read(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"txn_id": ["a"]}), bad)
    with pytest.raises(kinds.FraudKindsError, match="no column kind"):
        kinds.read(bad)
    history = tmp_path / "h.parquet"
    assert kinds.default_path(history) is None
    pq.write_table(pa.table({"txn_id": ["a"], "kind": ["card_chain"]}), tmp_path / "h.fraud_kinds.parquet")
    assert kinds.default_path(history) == tmp_path / "h.fraud_kinds.parquet"


# ------------------------------------------------------------------ every declared group is a candidate


@pytest.mark.unit
def test_every_declared_group_is_a_candidate_and_merchant_features_are_found_by_entity(monkeypatch) -> None:
    from featurestore import definitions as defs
    from featurestore.definitions import Aggregate, FeatureGroup, Registry
    from model import features as feats

    shop = FeatureGroup(name="shop_risk_3d", entity="merchant", window_ms=3 * defs.DAY_MS, source="batch",
                        ttl_s=86_400, features=(Aggregate("shop_txns_3d", "count"),))
    spend = FeatureGroup(name="card_spend_2d", entity="card", window_ms=2 * defs.DAY_MS, source="batch",
                         ttl_s=86_400, features=(Aggregate("card_spend_2d", "sum"),))
    groups = (*defs.REGISTRY.groups, spend, shop)
    reg = Registry.__new__(Registry)  # today's Registry may still refuse several batch groups: skip its check
    object.__setattr__(reg, "groups", groups)
    object.__setattr__(reg, "ratios", defs.REGISTRY.ratios)
    object.__setattr__(reg, "model_features", defs.REGISTRY.model_features)
    object.__setattr__(reg, "inputs", defs.REGISTRY.inputs)
    monkeypatch.setattr(defs, "REGISTRY", reg)
    monkeypatch.setattr(defs, "FEATURE_GROUPS", groups)
    monkeypatch.setattr(defs, "ALL_FEATURES", reg.all_features)
    names = [g.name for g in feats.candidate_groups()]
    # every group, in blocks of one entity and source, in declaration order, then the event-time features (the
    # ratios are base inputs)
    assert names == ["card_agg_10m + card_agg_1m", "card_agg_1w + card_agg_1d + card_agg_30d + card_spend_2d",
                     "merchant_agg_1d + merchant_agg_7d + merchant_agg_30d + shop_risk_3d", "event time"]
    assert feats.candidate_groups()[1].features == ("num_trans_last_1w", "avg_amt_last_1w", "num_trans_last_1d",
                                                    "avg_amt_last_1d", "num_trans_last_30d", "avg_amt_last_30d",
                                                    "card_spend_2d")
    assert feats.candidate_groups()[2].features[-1] == "shop_txns_3d"
    used = feats.ordered(["num_trans_last_10m", "card_spend_2d", "shop_txns_3d"])
    assert feats.merchant_features(used) == ("shop_txns_3d",)
    assert feats.entity_of("count_ratio") == "card" and feats.entity_of("amount") is None
