"""The report's ranking metrics against scikit-learn's definitions (the oracle): average precision (AUC-PR) and
ROC AUC, tied scores across classes included, and NaN where a class is missing."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(8))
def test_aucpr_and_roc_auc_equal_scikit_learns(seed: int) -> None:
    from model.metrics import average_precision, evaluate, ranking_metrics

    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 40_000))
    y = (rng.random(n) < [0.003, 0.02, 0.3, 0.9][seed % 4]).astype(np.int8)
    y[0] = 1  # at least one fraud row
    s = rng.random(n) + y * rng.random(n)
    if seed % 2:
        s = np.round(s, 1)  # a few distinct scores: large ties across classes
    aucpr, roc = ranking_metrics(y, s)
    assert aucpr == pytest.approx(average_precision_score(y, s), rel=1e-9)
    assert average_precision(y, s) == aucpr
    if y.min() == 0:
        assert roc == pytest.approx(roc_auc_score(y, s), rel=1e-9)
        m = evaluate(y, s, 0.5)
        assert (m.aucpr, m.roc_auc) == (aucpr, roc)


@pytest.mark.unit
def test_a_missing_class_gives_nan_not_an_error() -> None:
    from model.metrics import ranking_metrics

    assert all(np.isnan(ranking_metrics(np.zeros(10), np.arange(10.0))))  # no fraud: neither is defined
    aucpr, roc = ranking_metrics(np.ones(10), np.arange(10.0))  # no legitimate row: precision is 1 everywhere
    assert aucpr == pytest.approx(1.0) and np.isnan(roc)
    assert ranking_metrics(np.array([0, 1, 0, 1]), np.array([0.2, 0.2, 0.2, 0.2])) == (0.5, 0.5)
