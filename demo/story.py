"""The seed's story (SPEC section 9), as data: which cards tell it, what they send, and what must come out.

Three normal cards send one transaction each (amounts 100-5,000) and must be NOT FRAUD; then a fourth card is
attacked: 10 transactions 1-2 s apart, amounts 1-50; the first must be NOT FRAUD, the other nine FRAUD, and the
10-minute counts must read exactly 1..10.

**The rule that chooses the four cards** (from the generated history and today's 1-week snapshot only; nothing
here looks at the model):

1. *Ordinary activity*: the card's weekly count (`num_trans_last_1w` of today's snapshot) lies in the middle half
   of all cards' (25th to 75th percentile), and no transaction of the card is in a fraud chain of the history.
2. *A card whose typical purchase is a story amount*: its 1-week average amount lies in [100, 5,000], the range of
   the story's normal amounts. (A card that usually spends 20 is not "normal" at 2,000; and the card-testing charges
   of 1-50 are small for such a card, which is what card testing is.)
3. *Quiet right now*: its online 10-minute window is empty, so the story's counts start at 1 (a rerun within 10
   minutes moves on to the next cards).
4. Ordered by entity key (a keyed hash: deterministic, unrelated to behaviour); the first three are the normal
   cards and the fourth is the attacked one.

Each normal card repeats its latest purchase of the history within 100-5,000 (an amount it really pays; its 1-week
average if it has none in that range, clipped to it).
The attack's amounts (uniform in [1, 50]) and gaps (uniform in [1, 2] s) come from a generator seeded by `--seed`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore.entity import mask_pan

NORMAL_CARDS = 3
ATTACK_LENGTH = 10
NORMAL_AMOUNT_RANGE = (100.0, 5_000.0)
ATTACK_AMOUNT_RANGE = (1.0, 50.0)
ATTACK_GAP_S = (1.0, 2.0)
ACTIVITY_QUANTILES = (0.25, 0.75)
FRAUD, NOT_FRAUD = "FRAUD", "NOT_FRAUD"
#: The table's columns (SPEC section 9's JSON keys, in order).
COLUMNS = ("phase", "card", "amount", "num_trans_last_10m", "amt_ratio1", "amt_ratio2", "count_ratio", "score",
           "decision")


class StoryError(RuntimeError):
    """The history cannot tell the story (too few cards fit the rule); the message says what to change."""


@dataclass(frozen=True)
class StoryCard:
    pan: str
    card: str  # entity key
    num_trans_last_1w: int
    avg_amt_last_1w: float

    @property
    def masked(self) -> str:
        return mask_pan(self.pan)


@dataclass(frozen=True)
class StoryTxn:
    phase: str  # "normal" or "attack"
    position: int  # 1-based within its phase (for the attack: 1..10)
    card: StoryCard
    txn_id: str
    amount: float
    offset_ms: int  # planned offset from the start of its phase (the attack's gaps)
    merchant: str
    category: str

    def body(self, ts: int | None) -> dict:
        """The request body a payment client sends to POST /v1/score (the card number only in the body)."""
        out = {"txn_id": self.txn_id, "cc_num": self.card.pan, "amount": self.amount, "merchant": self.merchant,
               "category": self.category}
        if ts is not None:
            out["ts"] = ts
        return out

    @property
    def expected(self) -> str:
        """The story's decision: the normal cards and the attack's first transaction pass, the rest are fraud."""
        return NOT_FRAUD if self.phase == "normal" or self.position == 1 else FRAUD


def candidates(snapshot: pd.DataFrame, pans: Mapping[str, str], fraud_cards: Iterable[str]) -> pd.DataFrame:
    """Rule steps 1, 2 and 4: the cards of `snapshot` (columns card, num_trans_last_1w, avg_amt_last_1w) that may
    tell the story, ordered by entity key. `pans` maps entity key -> card number for the history's cards."""
    lo_q, hi_q = snapshot["num_trans_last_1w"].quantile(list(ACTIVITY_QUANTILES))
    lo_amt, hi_amt = NORMAL_AMOUNT_RANGE
    fraud = set(fraud_cards)
    ok = (snapshot["num_trans_last_1w"].between(lo_q, hi_q) & snapshot["avg_amt_last_1w"].between(lo_amt, hi_amt)
          & ~snapshot["card"].isin(fraud) & snapshot["card"].isin(set(pans)))
    return snapshot[ok].sort_values("card", kind="stable").reset_index(drop=True)


def choose_cards(snapshot: pd.DataFrame, pans: Mapping[str, str], fraud_cards: Iterable[str],
                 quiet: Callable[[str], bool], n: int = NORMAL_CARDS + 1) -> list[StoryCard]:
    """The first `n` candidates whose online 10-minute window is empty (`quiet(card)`, rule step 3)."""
    pool = candidates(snapshot, pans, fraud_cards)
    chosen: list[StoryCard] = []
    for row in pool.itertuples(index=False):
        if quiet(row.card):
            chosen.append(StoryCard(pans[row.card], row.card, int(row.num_trans_last_1w),
                                    float(row.avg_amt_last_1w)))
            if len(chosen) == n:
                return chosen
    raise StoryError(f"only {len(chosen)} of the {len(pool)} cards that fit the story's rule (ordinary weekly "
                     f"activity, a typical purchase of {NORMAL_AMOUNT_RANGE[0]:,.0f}-{NORMAL_AMOUNT_RANGE[1]:,.0f}, "
                     f"never attacked) are quiet now; {n} are needed: generate more cards (--cards)")


def normal_amount(card: StoryCard, history_amounts: Iterable[float]) -> float:
    """The card's latest purchase within the story's normal range (`history_amounts` in time order), else its
    1-week average clipped to the range."""
    lo, hi = NORMAL_AMOUNT_RANGE
    fitting = [a for a in history_amounts if lo <= a <= hi]
    return round(fitting[-1] if fitting else min(max(card.avg_amt_last_1w, lo), hi), 2)


def plan(cards: list[StoryCard], seed: int, normal: list[tuple[float, str, str]] | None = None) -> list[StoryTxn]:
    """The story's transactions in send order: one per normal card, then the attack on the last card.

    `normal` gives each normal card's (amount, merchant, category); by default its 1-week average, clipped."""
    if len(cards) != NORMAL_CARDS + 1:
        raise ValueError(f"the story needs {NORMAL_CARDS + 1} cards, got {len(cards)}")
    rng = np.random.default_rng(seed)
    run = uuid.uuid4().hex[:8]
    normal = normal or [(normal_amount(c, ()), "Corner Grocery", "grocery_pos") for c in cards[:NORMAL_CARDS]]
    txns: list[StoryTxn] = []
    for i, (card, (amount, merchant, category)) in enumerate(zip(cards[:NORMAL_CARDS], normal, strict=True), 1):
        txns.append(StoryTxn("normal", i, card, f"demo-{run}-n{i}", amount, 0, merchant, category))
    victim = cards[NORMAL_CARDS]
    amounts = np.round(rng.uniform(*ATTACK_AMOUNT_RANGE, ATTACK_LENGTH), 2)
    gaps_ms = np.round(rng.uniform(*ATTACK_GAP_S, ATTACK_LENGTH) * 1000).astype(np.int64)
    gaps_ms[0] = 0
    offsets = np.cumsum(gaps_ms)
    for k in range(ATTACK_LENGTH):
        txns.append(StoryTxn("attack", k + 1, victim, f"demo-{run}-a{k + 1:02d}", float(amounts[k]), int(offsets[k]),
                             "Online Electronics Outlet", "shopping_net"))
    return txns


@dataclass
class Outcome:
    """What the endpoint answered for one story transaction (and what the stream scored for it)."""

    txn: StoryTxn
    ts: int
    answer: dict
    stream: dict | None = None

    def row(self) -> dict:
        """One table row, SPEC section 9's JSON shape (NaN as None)."""
        f = self.answer["features"]
        return {"phase": self.txn.phase, "card": self.txn.card.masked, "amount": self.txn.amount,
                "num_trans_last_10m": _count(f.get("num_trans_last_10m")), "amt_ratio1": _num(f.get("amt_ratio1")),
                "amt_ratio2": _num(f.get("amt_ratio2")), "count_ratio": _num(f.get("count_ratio")),
                "score": _num(self.answer["score"]), "decision": self.answer["decision"]}


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _count(v):
    v = _num(v)
    return None if v is None else int(v)


@dataclass
class Verdict:
    counts_ok: bool
    decisions_ok: bool
    counts: list
    wrong: list[Outcome]

    @property
    def ok(self) -> bool:
        return self.counts_ok and self.decisions_ok


def verdict(outcomes: list[Outcome]) -> Verdict:
    """Counts 1..10 for the attack (1 for each normal card) and the story's decisions."""
    counts = [o.answer["features"].get("num_trans_last_10m") for o in outcomes]
    want = [1] * NORMAL_CARDS + list(range(1, ATTACK_LENGTH + 1))
    wrong = [o for o in outcomes if o.answer["decision"] != o.txn.expected]
    return Verdict(counts == want, not wrong, counts, wrong)
