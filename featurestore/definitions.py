"""Feature groups as data: the single place that names every feature, its window and the model's input order."""

from __future__ import annotations

from dataclasses import dataclass

MINUTE_MS = 60_000
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Feature:
    name: str
    aggregation: str  # "count" or "mean"
    column: str  # the event field it aggregates


@dataclass(frozen=True)
class FeatureGroup:
    """A set of per-card aggregates over one window, computed by one path (stream or batch)."""

    name: str
    entity: str
    window_ms: int
    source: str  # "stream" or "batch"
    ttl_s: int
    features: tuple[Feature, ...]

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True)
class RatioFeature:
    """numerator / denominator, computed at request time by `featurestore.ratios`."""

    name: str
    numerator: str
    denominator: str


CARD_AGG_10M = FeatureGroup(
    name="card_agg_10m",
    entity="card",
    window_ms=10 * MINUTE_MS,
    source="stream",
    ttl_s=2 * 86_400,
    features=(
        Feature("num_trans_last_10m", "count", "amount"),
        Feature("avg_amt_last_10m", "mean", "amount"),
    ),
)

CARD_AGG_1W = FeatureGroup(
    name="card_agg_1w",
    entity="card",
    window_ms=7 * DAY_MS,
    source="batch",
    # A snapshot stays readable for two nights so a late batch run never leaves the scorer empty-handed.
    ttl_s=2 * 86_400 + 6 * 3_600,
    features=(
        Feature("num_trans_last_1w", "count", "amount"),
        Feature("avg_amt_last_1w", "mean", "amount"),
    ),
)

FEATURE_GROUPS: tuple[FeatureGroup, ...] = (CARD_AGG_10M, CARD_AGG_1W)

RATIO_FEATURES: tuple[RatioFeature, ...] = (
    RatioFeature("amt_ratio1", "avg_amt_last_10m", "avg_amt_last_1w"),
    RatioFeature("amt_ratio2", "amount", "avg_amt_last_1w"),
    RatioFeature("count_ratio", "num_trans_last_10m", "num_trans_last_1w"),
)

#: The model's input columns, in order. Training and serving both build vectors from this tuple.
MODEL_FEATURES: tuple[str, ...] = ("amount", "amt_ratio1", "amt_ratio2", "count_ratio")

#: Every named value a score carries: the raw amount, both groups, and the ratios.
ALL_FEATURES: tuple[str, ...] = (
    ("amount",)
    + CARD_AGG_10M.feature_names
    + CARD_AGG_1W.feature_names
    + tuple(r.name for r in RATIO_FEATURES)
)

#: An event more than this far behind its card's newest event is not aggregated (SPEC section 7).
DEFAULT_ALLOWED_LATENESS_MS = 10 * MINUTE_MS
#: An event time further than this ahead of the worker's clock is refused (reason `future`, SPEC section 2), and no
#: event moves a card's lateness horizon past the worker's clock.
DEFAULT_MAX_FUTURE_MS = DAY_MS
#: How long window events are kept online; older ones can no longer count for any on-time event.
DEFAULT_EVENT_RETENTION_MS = CARD_AGG_10M.window_ms + DEFAULT_ALLOWED_LATENESS_MS
