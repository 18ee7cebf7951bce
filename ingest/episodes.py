"""Compromised-merchant episodes for `velocity generate`: the fraud a card's own velocity cannot see.

A merchant is compromised for a window of whole days (a skimmed terminal, a breached shop). While it is, a share
of the cards that use it (its customers: cards with a legitimate transaction there anywhere in the history) get
one or a few fraudulent transactions AT that merchant, at ordinary hours, with amounts drawn from that merchant's
own legitimate amounts. Each card looks normal on its own; only the merchant's fraud rate gives it away.

Everything is vectorized NumPy over the legitimate rows; no legitimate row is read back or changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


@dataclass
class Episodes:
    """The episodes and their fraud rows (unsorted; the caller merges them into the history)."""

    merchant: np.ndarray  # (episodes,) merchant index
    start_day: np.ndarray  # (episodes,) first compromised day (index from the history's first day)
    end_day: np.ndarray  # (episodes,) first day after the window (exclusive)
    customers: np.ndarray  # (episodes,) the merchant's customers in the history
    victims: np.ndarray  # (episodes,) customers that got fraud
    row_episode: np.ndarray  # per fraud row: its episode
    row_card: np.ndarray  # per fraud row: card index
    row_ts: np.ndarray  # per fraud row: epoch ms
    row_amount: np.ndarray  # per fraud row: amount drawn from the merchant's legitimate amounts

    @property
    def rows(self) -> int:
        return int(self.row_card.size)


def _csr(keys: np.ndarray, values: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """values grouped by key: (values sorted by key, offsets of length n_keys + 1)."""
    order = np.argsort(keys, kind="stable")
    return values[order], np.searchsorted(keys[order], np.arange(n_keys + 1))


def make_episodes(rng: np.random.Generator, *, card: np.ndarray, merchant: np.ndarray, amount: np.ndarray,
                  cards: int, merchants: int, start_ms: int, days: int, target_rows: int, card_share: float,
                  days_min: int, days_max: int, per_card_max: int, hourly: np.ndarray) -> Episodes:
    """Episodes on distinct merchants, as many as it takes to reach about `target_rows` fraud rows.

    `card`, `merchant`, `amount` are the legitimate rows. Merchants are taken in a random order; each adds its
    expected rows (card_share x customers x mean rows per victim) until the target is reached.
    """
    pairs = np.unique(merchant.astype(np.int64) * cards + card)
    cust_card, cust_off = (pairs % cards).astype(np.int32), np.searchsorted(pairs // cards, np.arange(merchants + 1))
    n_cust = np.diff(cust_off)
    candidates = rng.permutation(merchants)
    candidates = candidates[n_cust[candidates] > 0]
    expected = np.cumsum(card_share * n_cust[candidates] * (1 + per_card_max) / 2)
    n_ep = 0 if target_rows <= 0 or not candidates.size else int(min(candidates.size,
                                                                    np.searchsorted(expected, target_rows) + 1))
    ep_m = candidates[:n_ep]
    dur = rng.integers(days_min, days_max + 1, n_ep)
    start_day = rng.integers(0, max(days - 1, 1), n_ep)
    end_day = np.minimum(start_day + dur, days)

    # Victims: each customer of an episode's merchant, with probability card_share.
    counts = n_cust[ep_m]
    c_ep = np.repeat(np.arange(n_ep), counts)
    c_pos = np.arange(c_ep.size) - np.repeat(np.cumsum(counts) - counts, counts)
    c_card = cust_card[cust_off[ep_m][c_ep] + c_pos]
    hit = rng.random(c_ep.size) < card_share
    v_ep, v_card = c_ep[hit], c_card[hit]
    victims = np.bincount(v_ep, minlength=n_ep)

    # Each victim: 1..per_card_max fraudulent transactions at the merchant, on days of the window, usual hours.
    k = rng.integers(1, per_card_max + 1, v_ep.size)
    r_ep = np.repeat(v_ep, k)
    r_card = np.repeat(v_card, k)
    span = end_day[r_ep] - start_day[r_ep]
    day = start_day[r_ep] + np.floor(rng.random(r_ep.size) * span).astype(np.int64)
    hour = rng.choice(24, r_ep.size, p=hourly / hourly.sum())
    r_ts = start_ms + day * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, r_ep.size)

    # Amounts like the merchant's usual ones: a random legitimate amount of that merchant.
    m_amount, m_off = _csr(merchant, amount, merchants)
    m = ep_m[r_ep]
    pick = m_off[m] + np.floor(rng.random(r_ep.size) * (m_off[m + 1] - m_off[m])).astype(np.int64)
    r_amount = m_amount[pick]
    return Episodes(ep_m, start_day, end_day, counts, victims, r_ep, r_card.astype(np.int32), r_ts.astype(np.int64),
                    r_amount)


def label_delays_ms(rng: np.random.Generator, n: int, *, min_days: float, typical_days: float, max_days: float,
                    tail_share: float) -> np.ndarray:
    """How long after a fraud its label is known (a chargeback, a complaint): most within min..typical days
    (a skewed bump, mode about a quarter of the way in), a `tail_share` spread evenly over typical..max days."""
    main = min_days + (typical_days - min_days) * rng.beta(1.5, 3.0, n)
    tail = rng.uniform(typical_days, max_days, n)
    days = np.where(rng.random(n) < tail_share, tail, main)
    return np.round(days * DAY_MS).astype(np.int64)
