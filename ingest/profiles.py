"""Per-card and per-merchant profiles, made with Faker once per card/merchant (never per transaction)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from faker import Faker

CATEGORIES = (
    "grocery_pos", "gas_transport", "home", "shopping_pos", "kids_pets", "shopping_net", "entertainment",
    "food_dining", "personal_care", "health_fitness", "misc_pos", "misc_net", "grocery_net", "travel",
)
CATEGORY_WEIGHTS = np.array([14, 12, 11, 10, 9, 8, 8, 7, 7, 7, 6, 5, 4, 3], dtype=float)


def luhn_check_digits(body: np.ndarray) -> np.ndarray:
    """Luhn check digit for each row of a (n, 15) digit matrix, vectorized."""
    digits = body[:, ::-1].astype(np.int64)  # rightmost body digit is doubled (check digit goes after it)
    doubled = digits[:, 0::2] * 2
    doubled -= np.where(doubled > 9, 9, 0)
    total = doubled.sum(axis=1) + digits[:, 1::2].sum(axis=1)
    return (10 - total % 10) % 10


def luhn_valid(pan: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - (9 if d * 2 > 9 else 0)
        total += d
    return total % 10 == 0


def visa_pans(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct Visa-like 16-digit PANs (leading 4, valid Luhn digit)."""
    pans: list[str] = []
    seen: set[str] = set()
    while len(pans) < n:
        k = n - len(pans)
        body = np.concatenate([np.full((k, 1), 4), rng.integers(0, 10, (k, 14))], axis=1)
        check = luhn_check_digits(body)
        full = np.concatenate([body, check[:, None]], axis=1)
        for row in full.astype(np.uint8) + ord("0"):
            pan = row.tobytes().decode()
            if pan not in seen:
                seen.add(pan)
                pans.append(pan)
    return np.array(pans, dtype=object)


@dataclass
class Profiles:
    pans: np.ndarray  # (cards,) str
    holders: np.ndarray  # (cards,) str
    rate_per_day: np.ndarray  # (cards,) float: heavy-tailed across cards
    amount_mu: np.ndarray  # (cards,) lognormal location of the card's amounts
    amount_sigma: np.ndarray  # (cards,) lognormal scale
    home_merchants: np.ndarray  # (cards, k) merchant indices
    merchant_names: np.ndarray  # (merchants,) str
    merchant_categories: np.ndarray  # (merchants,) str


def make_profiles(cards: int, rng: np.random.Generator, seed: int, mean_rate: float,
                  merchants: int | None = None, home_k: int = 8) -> Profiles:
    fake = Faker()
    fake.seed_instance(seed)
    merchants = merchants or max(50, min(3000, cards // 4))
    merchant_names = np.array([fake.company() for _ in range(merchants)], dtype=object)
    cat_p = CATEGORY_WEIGHTS / CATEGORY_WEIGHTS.sum()
    merchant_categories = np.array(CATEGORIES, dtype=object)[rng.choice(len(CATEGORIES), merchants, p=cat_p)]
    holders = np.array([fake.name() for _ in range(cards)], dtype=object)
    # Heavy-tailed activity: most cards a few times a day, a few cards many times (lognormal, sigma 0.9).
    raw = rng.lognormal(0.0, 0.9, cards)
    rate = raw * (mean_rate / raw.mean())
    return Profiles(
        pans=visa_pans(cards, rng),
        holders=holders,
        rate_per_day=rate,
        amount_mu=rng.normal(3.4, 0.7, cards),
        amount_sigma=rng.uniform(0.5, 1.2, cards),
        home_merchants=rng.integers(0, merchants, (cards, home_k)),
        merchant_names=merchant_names,
        merchant_categories=merchant_categories,
    )
