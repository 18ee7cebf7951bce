"""The model's inputs, taken from the feature declarations (`featurestore.definitions`) and never restated here.

Order: the declared model features (the original system's four) first, then any other declared feature the
training run kept, in the declarations' own order. Each feature's *declaration signature* (what computes it:
group, window, aggregation, or a ratio's operands) is recorded with a model, so a scorer can tell whether the
current definitions still produce exactly what the model was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from featurestore import definitions as defs


class IncompatibleFeaturesError(ValueError):
    """A model needs a feature the current definitions cannot produce (missing, or declared differently)."""


@dataclass(frozen=True)
class CandidateGroup:
    """Declared features the model may add to its base inputs, one block of feature groups at a time."""

    name: str
    features: tuple[str, ...]


def base_features() -> tuple[str, ...]:
    """The declared model input order (the original system's four)."""
    return tuple(defs.MODEL_FEATURES)


def all_features() -> tuple[str, ...]:
    return tuple(defs.ALL_FEATURES)


def candidate_groups(event_time: bool = True) -> tuple[CandidateGroup, ...]:
    """The features beyond the base inputs, one candidate per block of declared groups that share an entity and a
    source (the card's stream windows, the card's nightly windows, the merchant's nightly windows...), in
    declaration order, then the event-time features, then the ratios. Blocks, not single groups: windows of one
    entity work together (a merchant's last day against its month shows a compromise that neither shows alone,
    which a group-by-group greedy pass misses), and one fit per block keeps `velocity train` within its time
    however many windows are declared. `event_time=False` leaves the event-time features out: a model that does not
    read the clock."""
    base = set(base_features())
    blocks: dict[tuple[str, str], list] = {}
    for group in defs.FEATURE_GROUPS:
        blocks.setdefault((group.entity, group.source), []).append(group)
    out = []
    for groups in blocks.values():
        extra = tuple(f for g in groups for f in g.feature_names if f not in base)
        if extra:
            out.append(CandidateGroup(" + ".join(g.name for g in groups), extra))
    parts = tuple(e.name for e in defs.EVENT_TIME_FEATURES if e.name not in base) if event_time else ()
    if parts:
        out.append(CandidateGroup("event time", parts))
    ratios = tuple(r.name for r in defs.RATIO_FEATURES if r.name not in base)
    if ratios:
        out.append(CandidateGroup("ratios", ratios))
    return tuple(out)


def entity_of(name: str) -> str | None:
    """The entity a declared feature is keyed by (a ratio: its operands' entity, the first non-card one); None for
    a per-transaction input such as the amount."""
    group = defs.REGISTRY.group_of(name)
    if group is not None:
        return group.entity
    for ratio in defs.RATIO_FEATURES:
        if ratio.name == name:
            ents = [e for e in (entity_of(ratio.numerator), entity_of(ratio.denominator)) if e]
            return next((e for e in ents if e != "card"), ents[0] if ents else None)
    return None


def merchant_features(features: Iterable[str]) -> tuple[str, ...]:
    """Those of `features` keyed by the merchant (any entity named for it), for the report's no-merchant baseline."""
    return tuple(f for f in features if "merchant" in (entity_of(f) or ""))


def ordered(extra: Iterable[str]) -> tuple[str, ...]:
    """Base features first, then `extra` in the declarations' order (ALL_FEATURES); unknown names are refused."""
    extra = set(extra)
    unknown = sorted(extra - set(all_features()))
    if unknown:
        raise IncompatibleFeaturesError(f"not declared in featurestore.definitions: {', '.join(unknown)}")
    base = base_features()
    return base + tuple(f for f in all_features() if f in extra and f not in base)


def _group_signature(group) -> dict:
    # ttl_s is storage policy, not meaning: a changed TTL does not change what a feature's value is.
    return {k: getattr(group, k) for k in ("name", "entity", "window_ms", "source") if hasattr(group, k)}


def _signature(name: str) -> dict | None:
    for group in defs.FEATURE_GROUPS:
        for feat in group.features:
            if feat.name == name:
                return {"kind": "aggregate", "group": _group_signature(group), "feature": dataclasses.asdict(feat)}
    for part in defs.EVENT_TIME_FEATURES:
        if part.name == name:
            return {"kind": "event_time", "feature": dataclasses.asdict(part)}
    for ratio in defs.RATIO_FEATURES:
        if ratio.name == name:
            return {"kind": "ratio", "numerator": _signature(ratio.numerator),
                    "denominator": _signature(ratio.denominator)}
    if name in all_features():  # an input of every score (the transaction's own amount)
        return {"kind": "input", "name": name}
    return None


def signatures(features: Sequence[str]) -> dict[str, dict]:
    """feature -> its declaration today (JSON-ready); raises for a name that is not declared."""
    out = {}
    for name in features:
        sig = _signature(name)
        if sig is None:
            raise IncompatibleFeaturesError(f"{name!r} is not declared in featurestore.definitions")
        out[name] = sig
    return out


def declarations_version() -> str:
    """A short hash of every declaration (groups, ratios, model input order): it changes whenever one does."""
    registry = getattr(defs, "REGISTRY", None)
    if registry is not None and hasattr(registry, "version"):
        return str(registry.version)
    text = json.dumps(signatures(all_features()), sort_keys=True) + json.dumps(base_features())
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_producible(features: Sequence[str], recorded: dict[str, dict], *, model: str = "the model") -> None:
    """Refuse (IncompatibleFeaturesError, saying what and what to do) unless the current definitions produce every
    feature in `features` exactly as declared when the model was trained (`recorded`)."""
    problems = []
    for name in features:
        now = _signature(name)
        if now is None:
            problems.append(f"{name} (no longer declared)")
        elif name in recorded and json.loads(json.dumps(now)) != recorded[name]:
            problems.append(f"{name} (declared differently now: {_diff(recorded[name], now)})")
        elif name not in recorded:
            problems.append(f"{name} (the model records no declaration for it)")
    if problems:
        raise IncompatibleFeaturesError(
            f"{model} needs features the current feature definitions (version {declarations_version()}) cannot "
            f"produce: {'; '.join(problems)}. Retrain with `velocity train`, or make a compatible model current "
            "with `velocity models use VERSION` (`velocity models list` shows which load).")


def _diff(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    parts = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return ", ".join(parts[:4]) or "changed"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
