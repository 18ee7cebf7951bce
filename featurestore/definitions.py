"""Feature groups as data: the one place that declares every feature, its window, its aggregation and the model's
input order. The offline SQL (DuckDB and Spark), the online read, the training-set schema, the serving vector and
`velocity features get` are all generated from a `Registry`; adding an aggregate is one edit here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

MINUTE_MS = 60_000
DAY_MS = 86_400_000

#: What an aggregate can compute over a column of the events in its window.
FUNCTIONS = ("count", "sum", "mean", "min", "max")
#: The event columns an aggregate reads. `amount` (held in integer cents); `known_fraud` is 1 when the
#: transaction's label as known at the group's cut-off is fraud (its latest version with labeled_at <= the cut-off,
#: SPEC section 4), else 0: only a nightly (batch) group has a cut-off, so only batch groups may read it.
COLUMNS = ("amount", "known_fraud")
#: The per-window statistics every function is derived from: count (n); over the amount in cents: sum (s), min
#: (mn), max (mx); over known_fraud: the number of known frauds (f).
STATS_OF = {"count": ("n",), "sum": ("s",), "mean": ("n", "s"), "min": ("mn",), "max": ("mx",)}
FRAUD_STATS_OF = {"count": ("n",), "sum": ("f",), "mean": ("n", "f")}
STAT_ORDER = ("n", "s", "mn", "mx", "f")
#: The entities features are kept for, and the event column holding each one's key. A card's key is the keyed hash
#: of its PAN (SPEC section 3); a merchant's is its merchant id as the event carries it (no PAN involved: PAN-like
#: digit runs are masked at the edge).
ENTITY_COLUMNS = {"card": "card", "merchant": "merchant"}


@dataclass(frozen=True)
class Aggregate:
    """One feature: `function` over the event `column` of the transactions in its group's window."""

    name: str
    function: str
    column: str = "amount"

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ValueError(f"{self.name}: unknown aggregation {self.function!r} (one of {', '.join(FUNCTIONS)})")
        if self.column not in COLUMNS:
            raise ValueError(f"{self.name}: unknown column {self.column!r} (one of {', '.join(COLUMNS)})")
        if self.column == "known_fraud" and self.function not in FRAUD_STATS_OF:
            raise ValueError(f"{self.name}: known_fraud is counted, summed or averaged, not {self.function!r}")

    @property
    def stats(self) -> tuple[str, ...]:
        """The statistics this feature is derived from (see STATS_OF)."""
        return (FRAUD_STATS_OF if self.column == "known_fraud" else STATS_OF)[self.function]

    @property
    def default(self) -> float:
        """The value for an entity absent from an existing snapshot (no transactions in the window): counts and
        sums are 0; a mean, min or max of nothing is NaN (XGBoost's missing value)."""
        return 0.0 if self.function in ("count", "sum") else float("nan")


@dataclass(frozen=True)
class FeatureGroup:
    """Per-entity aggregates over one window, computed by one path: the stream (as of each transaction) or the
    nightly batch (as of each cut-off)."""

    name: str
    entity: str
    window_ms: int
    source: str  # "stream" or "batch"
    ttl_s: int
    features: tuple[Aggregate, ...]

    def __post_init__(self) -> None:
        if self.source not in ("stream", "batch"):
            raise ValueError(f"{self.name}: source must be stream or batch, not {self.source!r}")
        if self.source == "batch" and self.window_ms % DAY_MS:
            raise ValueError(f"{self.name}: a batch window is whole days (cut-offs are midnights)")
        if self.entity not in ENTITY_COLUMNS:
            raise ValueError(f"{self.name}: unknown entity {self.entity!r} (one of {', '.join(ENTITY_COLUMNS)})")
        if self.source == "stream" and self.entity != "card":
            raise ValueError(f"{self.name}: the stream keeps window state per card only")
        if self.source == "stream" and any(f.column == "known_fraud" for f in self.features):
            raise ValueError(f"{self.name}: known_fraud needs a cut-off; only batch groups may read it")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def stats(self) -> tuple[str, ...]:
        """The statistics this group's features need, in a fixed order."""
        need = {s for f in self.features for s in f.stats}
        return tuple(s for s in STAT_ORDER if s in need)

    @property
    def entity_column(self) -> str:
        """The event column holding this group's entity key."""
        return ENTITY_COLUMNS[self.entity]


@dataclass(frozen=True)
class RatioFeature:
    """numerator / denominator, computed at request time by `featurestore.ratios.safe_ratio`."""

    name: str
    numerator: str
    denominator: str


#: The parts of a transaction's event time an EventTimeFeature can be: the hour of the day (0-23) and the day of
#: the week (0 = Monday .. 6 = Sunday), both in UTC, the event time's own zone (SPEC section 2: epoch ms).
TIME_PARTS = ("hour_of_day", "day_of_week")


@dataclass(frozen=True)
class EventTimeFeature:
    """A part of the transaction's own event time, computed at request time by `featurestore.event_time` (no state,
    nothing stored): fraud clusters at hours when the card's holder is rarely active, which no window sees."""

    name: str
    part: str

    def __post_init__(self) -> None:
        if self.part not in TIME_PARTS:
            raise ValueError(f"{self.name}: unknown event-time part {self.part!r} (one of {', '.join(TIME_PARTS)})")


@dataclass(frozen=True)
class Registry:
    """Every declared group and ratio, and the model's input order."""

    groups: tuple[FeatureGroup, ...]
    ratios: tuple[RatioFeature, ...]
    model_features: tuple[str, ...]
    #: Values every score carries besides the declared features (the transaction's own amount).
    inputs: tuple[str, ...] = field(default=("amount",))
    #: Parts of the transaction's own event time (computed, not stored).
    event_time: tuple[EventTimeFeature, ...] = ()

    def __post_init__(self) -> None:
        names = [*self.inputs, *(n for g in self.groups for n in g.feature_names),
                 *(e.name for e in self.event_time), *(r.name for r in self.ratios)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique across groups: {', '.join(dupes)}")
        for r in self.ratios:
            for operand in (r.numerator, r.denominator):
                if operand not in names:
                    raise ValueError(f"ratio {r.name}: {operand!r} is not a declared feature")
        unknown = [m for m in self.model_features if m not in names]
        if unknown:
            raise ValueError(f"model features not declared: {', '.join(unknown)}")

    @property
    def stream_groups(self) -> tuple[FeatureGroup, ...]:
        return tuple(g for g in self.groups if g.source == "stream")

    @property
    def batch_groups(self) -> tuple[FeatureGroup, ...]:
        return tuple(g for g in self.groups if g.source == "batch")

    @property
    def batch_group(self) -> FeatureGroup:
        return self.batch_groups[0]

    @property
    def longest_stream_window_ms(self) -> int:
        return max(g.window_ms for g in self.stream_groups)

    @property
    def group_features(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.feature_names)

    @property
    def event_time_features(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.event_time)

    @property
    def all_features(self) -> tuple[str, ...]:
        """Every named value a score carries: the inputs, every group's features, the event-time parts, then the
        ratios."""
        return (*self.inputs, *self.group_features, *self.event_time_features, *(r.name for r in self.ratios))

    @property
    def version(self) -> str:
        """Changes whenever a declaration changes: a model records it, a scorer checks it."""
        declared = (self.groups, self.ratios, self.model_features, *((self.event_time,) if self.event_time else ()))
        return hashlib.sha256(repr(declared).encode()).hexdigest()[:12]

    def group_of(self, feature: str) -> FeatureGroup | None:
        return next((g for g in self.groups if feature in g.feature_names), None)


CARD_AGG_10M = FeatureGroup(
    name="card_agg_10m",
    entity="card",
    window_ms=10 * MINUTE_MS,
    source="stream",
    ttl_s=2 * 86_400,
    features=(
        Aggregate("num_trans_last_10m", "count"),
        Aggregate("avg_amt_last_10m", "mean"),
    ),
)

#: A burst: the card's transactions in the last minute, by the same window rule as card_agg_10m (arrival order,
#: late ones left out, the transaction itself included). Served from the same stored window events (the 10-minute
#: read already holds them): no extra Redis work. `velocity train` keeps it because validation shows it helps (the
#: report's feature table; bench/RESULTS.md).
CARD_AGG_1M = FeatureGroup(
    name="card_agg_1m",
    entity="card",
    window_ms=MINUTE_MS,
    source="stream",
    ttl_s=2 * 86_400,
    features=(
        Aggregate("num_trans_last_1m", "count"),
    ),
)

CARD_AGG_1W = FeatureGroup(
    name="card_agg_1w",
    entity="card",
    window_ms=7 * DAY_MS,
    source="batch",
    # A superseded snapshot stays readable this long; the latest one stays until a newer one is published.
    ttl_s=2 * 86_400 + 6 * 3_600,
    features=(
        Aggregate("num_trans_last_1w", "count"),
        Aggregate("avg_amt_last_1w", "mean"),
    ),
)

#: Card spending windows over a day and a month, nightly like card_agg_1w (issue 16).
CARD_AGG_1D = FeatureGroup(
    name="card_agg_1d", entity="card", window_ms=DAY_MS, source="batch", ttl_s=2 * 86_400 + 6 * 3_600,
    features=(Aggregate("num_trans_last_1d", "count"), Aggregate("avg_amt_last_1d", "mean")),
)
CARD_AGG_30D = FeatureGroup(
    name="card_agg_30d", entity="card", window_ms=30 * DAY_MS, source="batch", ttl_s=2 * 86_400 + 6 * 3_600,
    features=(Aggregate("num_trans_last_30d", "count"), Aggregate("avg_amt_last_30d", "mean")),
)


def merchant_group(days: int) -> FeatureGroup:
    """A merchant's transactions over `days` before the cut-off and the frauds among them known by then: the
    compromised-merchant pattern (many cards defrauded at one shop) that no card feature sees."""
    return FeatureGroup(
        name=f"merchant_agg_{days}d", entity="merchant", window_ms=days * DAY_MS, source="batch",
        ttl_s=2 * 86_400 + 6 * 3_600,
        features=(
            Aggregate(f"merchant_num_trans_{days}d", "count"),
            Aggregate(f"merchant_fraud_count_{days}d", "sum", column="known_fraud"),
            Aggregate(f"merchant_fraud_rate_{days}d", "mean", column="known_fraud"),
        ),
    )


MERCHANT_AGG_1D, MERCHANT_AGG_7D, MERCHANT_AGG_30D = (merchant_group(d) for d in (1, 7, 30))

#: The hour of the day (UTC) the transaction happened: card thieves act around the clock, card holders mostly by
#: day. On the seed history's validation days `velocity train` keeps it: +0.0070 AUC-PR over every window
#: (bench/RESULTS.md).
HOUR_OF_DAY = EventTimeFeature("hour_of_day", "hour_of_day")

RATIO_FEATURES: tuple[RatioFeature, ...] = (
    RatioFeature("amt_ratio1", "avg_amt_last_10m", "avg_amt_last_1w"),
    RatioFeature("amt_ratio2", "amount", "avg_amt_last_1w"),
    RatioFeature("count_ratio", "num_trans_last_10m", "num_trans_last_1w"),
)

#: The product's declarations. Everything that computes, stores or serves features takes a Registry and
#: defaults to this one: the card's stream windows, its nightly 1-week, 1-day and 30-day windows, and the
#: merchant's nightly 1/7/30-day windows with the frauds known by each cut-off (issue 16), and the hour of the day.
REGISTRY = Registry(
    groups=(CARD_AGG_10M, CARD_AGG_1M, CARD_AGG_1W, CARD_AGG_1D, CARD_AGG_30D,
            MERCHANT_AGG_1D, MERCHANT_AGG_7D, MERCHANT_AGG_30D),
    ratios=RATIO_FEATURES,
    model_features=("amount", "amt_ratio1", "amt_ratio2", "count_ratio"),
    event_time=(HOUR_OF_DAY,),
)

#: The name the merchant groups were taught to the engines under, before they became the product's: an alias.
REGISTRY_WITH_MERCHANT = REGISTRY

FEATURE_GROUPS: tuple[FeatureGroup, ...] = REGISTRY.groups
EVENT_TIME_FEATURES: tuple[EventTimeFeature, ...] = REGISTRY.event_time
#: The model's base input columns, in order. `velocity train` starts from these and adds other declared groups
#: where validation shows they help; a trained model records its own feature list, which serving follows.
MODEL_FEATURES: tuple[str, ...] = REGISTRY.model_features
#: Every named value a score carries: the raw amount, every group's features, and the ratios.
ALL_FEATURES: tuple[str, ...] = REGISTRY.all_features

#: An event more than this far behind its card's newest event is not aggregated (SPEC section 7).
DEFAULT_ALLOWED_LATENESS_MS = 10 * MINUTE_MS
#: An event time further than this ahead of the worker's clock is refused (reason `future`, SPEC section 2), and no
#: event moves a card's lateness horizon past the worker's clock.
DEFAULT_MAX_FUTURE_MS = DAY_MS
#: How long (event time) window events and txn_id records stay online. Window + lateness (20 min) is the least
#: any on-time event needs; a day keeps the idempotency records of messages a crashed worker will be redelivered.
DEFAULT_EVENT_RETENTION_MS = DAY_MS
