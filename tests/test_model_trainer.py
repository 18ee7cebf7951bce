"""What keeps `velocity train` within its time at seed scale, on a small synthetic frame: early stopping scores a
fixed sample of the validation days (every fraud row) while every choice reads AUC-PR over all of them, training
matrices are reused across fits without changing what a fit learns, and the kept feature blocks follow the rule.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from model import data as data_mod
from model import features as feats

DAY_MS = 86_400_000


def _frame(seed: int = 0, per_day: int = 3000, days: int = 12) -> data_mod.TrainingData:
    """Fraud depends on the amount, the card's 10-minute count and the merchant's 7-day fraud rate; every other
    column is noise."""
    rng = np.random.default_rng(seed)
    base = int(dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    ts = np.sort(np.concatenate([base + d * DAY_MS + rng.integers(0, DAY_MS, per_day) for d in range(days)]))
    cols = feats.all_features()
    X = rng.random((ts.size, len(cols))).astype(np.float32)
    signal = (X[:, cols.index("amount")] + 2 * X[:, cols.index("num_trans_last_10m")]
              + 2 * X[:, cols.index("merchant_fraud_rate_7d")])
    y = (signal + 0.4 * rng.random(ts.size) > 4.3).astype(np.int8)
    return data_mod.TrainingData(X, cols, y, ts, np.zeros(ts.size, np.int32), np.ones(ts.size, bool),
                                 dt.date(2020, 1, 1), dt.date(2020, 1, 1 + days), "synthetic")


@pytest.mark.unit
def test_a_reused_training_matrix_learns_exactly_what_a_fresh_one_does() -> None:
    from model.trainer import DEFAULT_PARAMS, Imbalance, Trainer

    data = _frame()
    split = data_mod.split_by_day(data.ts)
    imb = Imbalance(True, 0.5)
    shared = Trainer(data, split, device="cpu", max_rounds=25)
    first = shared.fit("a", feats.base_features(), DEFAULT_PARAMS, imb)
    again = shared.fit("b", feats.base_features(), DEFAULT_PARAMS, imb)  # the same inputs: the matrix is reused
    assert len(shared._dtrain) == 1
    fresh = Trainer(data, split, device="cpu", max_rounds=25).fit("c", feats.base_features(), DEFAULT_PARAMS, imb)
    for fit in (again, fresh):
        assert fit.rounds == first.rounds and fit.train_rows == first.train_rows
        assert np.array_equal(fit.val_scores, first.val_scores)
    other = shared.fit("d", feats.base_features(), DEFAULT_PARAMS, Imbalance(True, 1.0))  # other rows: rebuilt
    assert len(shared._dtrain) == 2 and other.train_rows > first.train_rows


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(4))
def test_weighted_early_stopping_aucpr_is_average_precision_with_sample_weights(seed: int) -> None:
    """Early stopping's AUC-PR on a sample of the legitimate rows, each counted 1 / share: scikit-learn's average
    precision with those sample weights (ties across classes included)."""
    from sklearn.metrics import average_precision_score

    from model.metrics import AveragePrecision

    rng = np.random.default_rng(seed)
    y = (rng.random(30_000) < 0.02).astype(np.int8)
    s = np.round(rng.random(y.size) + y * rng.random(y.size), 2 + seed % 2).astype(np.float32)
    w = 1 / (0.1 + 0.3 * seed)
    expected = average_precision_score(y, s, sample_weight=np.where(y == 1, 1.0, w))
    assert AveragePrecision(y, neg_weight=w)(s) == pytest.approx(expected, rel=1e-9)


@pytest.mark.unit
def test_early_stopping_scores_every_fraud_row_and_a_fixed_share_of_the_rest_but_choices_read_all() -> None:
    from model.metrics import average_precision
    from model.trainer import DEFAULT_PARAMS, Imbalance, Trainer

    data = _frame(seed=2)
    split = data_mod.split_by_day(data.ts)
    trainer = Trainer(data, split, device="cpu", max_rounds=40, early_stopping_negative_rate=0.25)
    y_val = trainer.y("validation")
    stop = trainer.stop_rows
    assert set(np.flatnonzero(y_val == 1)) <= set(stop)  # every fraud row
    legit = int(np.sum(y_val == 0))
    assert 0.2 * legit < np.sum(y_val[stop] == 0) < 0.3 * legit
    again = Trainer(data, split, device="cpu", max_rounds=40, early_stopping_negative_rate=0.25)
    assert np.array_equal(again.stop_rows, stop)  # the same draw for every fit and run
    fit = trainer.fit("m", feats.base_features(), DEFAULT_PARAMS, Imbalance(True, 0.5))
    assert fit.val_scores.size == y_val.size  # a choice reads AUC-PR over every validation row
    assert fit.val_aucpr == average_precision(y_val, fit.val_scores)
    full = Trainer(data, split, device="cpu", max_rounds=40, early_stopping_negative_rate=1.0)
    assert full.stop_rows.size == y_val.size


@pytest.mark.unit
def test_the_kept_blocks_follow_the_rule_and_the_last_kept_fit_is_the_model() -> None:
    from model.trainer import DEFAULT_PARAMS, MIN_GAIN, Imbalance, Trainer, select_features

    data = _frame(seed=1)
    trainer = Trainer(data, data_mod.split_by_day(data.ts), device="cpu", max_rounds=200)
    sel = select_features(trainer, DEFAULT_PARAMS, Imbalance(True, 0.5))
    groups = feats.candidate_groups()
    assert len(sel.fits) == len(sel.rows) == 1 + len(groups)
    # The rule, read from the rows alone: a block joins when it adds >= MIN_GAIN to what was kept before it.
    kept_aucpr = sel.rows[0]["val_aucpr"]
    expected = set(feats.base_features())
    for row, group in zip(sel.rows[1:], groups, strict=True):
        assert row["kept"] == (row["val_aucpr"] - kept_aucpr >= MIN_GAIN)
        if row["kept"]:
            kept_aucpr = row["val_aucpr"]
            expected |= set(group.features)
    assert set(sel.fit.features) == expected and sel.fit.val_aucpr == kept_aucpr
    # The signal lives in the card's stream windows and the merchant's: both blocks are kept.
    assert {"num_trans_last_10m", "merchant_fraud_rate_7d"} <= set(sel.fit.features)
