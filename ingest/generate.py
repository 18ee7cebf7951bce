"""`velocity generate`: a reproducible, vectorized card-transaction history (SPEC section 2).

Legitimate traffic: each card has its own rate (heavy-tailed across cards), its own lognormal amount
distribution and a set of home merchants; times follow a daily rhythm. Fraud of two kinds, every row labeled 1,
no legitimate row touched:
- card chains: extra transactions on victim cards, 30-120 s apart by default with some faster bursts, mixing small
  card-testing charges and larger cash-out charges (a card's velocity shows them);
- compromised merchants (`ingest.episodes`): while a merchant is compromised, a share of its customers get
  fraudulent transactions there, with that merchant's usual amounts (only the merchant's fraud rate shows them).
Each fraud row's label becomes known late: `labeled_at` = ts + a drawn delay (null on legitimate rows, which are
never labeled). `write_fraud_kinds` writes the side file naming each fraud row's kind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.events import MAX_TS_MS, MIN_TS_MS
from ingest.episodes import label_delays_ms, make_episodes
from ingest.profiles import make_profiles

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
#: Relative activity per hour of day (UTC): quiet nights, busy lunch and evening.
HOURLY = np.array([1.0, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.5, 3.5, 4.0, 4.2, 4.6, 5.2, 5.0, 4.4, 4.2,
                   4.5, 5.2, 5.8, 5.5, 4.6, 3.5, 2.4, 1.6])
SCHEMA = pa.schema([
    ("txn_id", pa.string()), ("cc_num", pa.string()), ("amount", pa.float64()), ("ts", pa.int64()),
    ("merchant", pa.string()), ("category", pa.string()), ("fraud_label", pa.int8()), ("labeled_at", pa.int64()),
])
#: The fraud kinds the side file names (`write_fraud_kinds`); index = History.kind_of_row's code.
KINDS = ("legitimate", "card_chain", "compromised_merchant")
KINDS_SCHEMA = pa.schema([("txn_id", pa.string()), ("kind", pa.string())])


@dataclass(frozen=True)
class GenerateConfig:
    cards: int = 10_000
    days: int = 152
    start: dt.date = dt.date(2020, 1, 1)
    seed: int = 42
    fraud_rate: float = 0.0025
    chain_min: int = 3
    chain_max: int = 10
    gap_min_s: float = 30.0
    gap_max_s: float = 120.0
    fast_share: float = 0.15  # share of chains that are fast bursts (1-10 s apart)
    mean_rate_per_day: float = 3.55  # 10,000 cards x 152 days x 3.55 = 5.4M rows
    #: Compromised merchants: about this share of all rows is their fraud (0 turns episodes off).
    #: 0.0008: ~24% of fraud rows at seed scale, a large share as in the outside simulator of issue 16 (where
    #: card features missed compromised-merchant fraud entirely); --compromise-rate 0 turns episodes off.
    compromise_rate: float = 0.0008
    compromise_card_share: float = 0.25  # share of the merchant's customers that get fraud there
    compromise_days_min: int = 2
    compromise_days_max: int = 7
    compromise_per_card_max: int = 3  # fraudulent transactions per victim card: 1..this
    #: Label delays: most within min..typical days, a tail_share spread over typical..max days.
    label_delay_min_days: float = 1.0
    label_delay_typical_days: float = 14.0
    label_delay_max_days: float = 60.0
    label_delay_tail_share: float = 0.1

    def validate(self, *, now_ms: int | None = None, max_future_ms: int | None = None) -> None:
        """Raise ValueError (naming the flag, saying what to use instead) for a configuration to refuse.

        With now_ms and max_future_ms (the CLI passes them), rows must also fall where the stream worker
        accepts them: not before 2000-01-01 and not more than max_future_ms ahead of now.
        """
        for flag, value in (("--cards", self.cards), ("--days", self.days)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1 (got {value})")
        start_ms = _midnight_ms(self.start)
        if start_ms < MIN_TS_MS:
            raise ValueError(f"--start {self.start} is before {_day_of(MIN_TS_MS)}: the stream worker refuses "
                             f"event times before then (reason bad_ts); use --start {_day_of(MIN_TS_MS)} or later")
        last_ts = start_ms + self.days * DAY_MS - 1  # every row's ts is < start + days
        limit = MAX_TS_MS - 1 if now_ms is None or max_future_ms is None else min(now_ms + max_future_ms,
                                                                                   MAX_TS_MS - 1)
        if last_ts > limit:
            latest_ms = (limit + 1 - self.days * DAY_MS) // DAY_MS * DAY_MS
            bound = (f"more than {_duration(max_future_ms)} ahead of now (the stream worker dead-letters them as "
                     "`future`; the bound is VELOCITY_MAX_FUTURE_MS)" if limit < MAX_TS_MS - 1
                     else f"on or after {_day_of(MAX_TS_MS)}, which the stream worker refuses")
            fix = (f"the latest allowed start for --days {self.days} is {_day_of(latest_ms)}"
                   if latest_ms >= MIN_TS_MS else f"use fewer --days (at most {(limit + 1 - MIN_TS_MS) // DAY_MS})")
            raise ValueError(f"--start {self.start} with --days {self.days} gives rows up to "
                             f"{_day_of(last_ts)} 23:59 UTC, {bound}; {fix}")
        if not 0 <= self.fraud_rate < 0.5:
            raise ValueError("--fraud-rate must be in [0, 0.5)")
        if not 1 <= self.chain_min <= self.chain_max:
            raise ValueError("need 1 <= --chain-min <= --chain-max")
        if not 0 < self.gap_min_s <= self.gap_max_s:
            raise ValueError("need 0 < --chain-gap-min-s <= --chain-gap-max-s")
        if not 0 <= self.compromise_rate < 0.5 or self.fraud_rate + self.compromise_rate >= 0.5:
            raise ValueError("--compromise-rate must be in [0, 0.5), and with --fraud-rate below 0.5")
        if not 0 < self.compromise_card_share <= 1:
            raise ValueError("--compromise-card-share must be in (0, 1]")
        if not 1 <= self.compromise_days_min <= self.compromise_days_max:
            raise ValueError("need 1 <= --compromise-days-min <= --compromise-days-max")
        if self.compromise_per_card_max < 1:
            raise ValueError("compromise_per_card_max must be at least 1")
        if not 0 <= self.label_delay_min_days <= self.label_delay_typical_days <= self.label_delay_max_days:
            raise ValueError("need 0 <= label delay min <= typical <= max days")
        if not 0 <= self.label_delay_tail_share <= 1:
            raise ValueError("label_delay_tail_share must be in [0, 1]")


def _midnight_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _day_of(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).date().isoformat()


def _duration(ms: int) -> str:
    for unit, size in (("day", DAY_MS), ("hour", HOUR_MS), ("minute", 60_000), ("second", 1000)):
        if ms >= size and ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{ms} ms"


#: File extensions `velocity generate --out` accepts, and the format each one means.
OUTPUT_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


def output_format(path: Path, fmt: str | None = None) -> str:
    """The format to write `path` in, checked before any work: a known extension, a matching --format, and a
    path that can be written. Raises ValueError (stores.outputs.OutputError for the path) otherwise."""
    from stores.outputs import check_output_file

    path = Path(path)
    if fmt is not None and fmt not in ("parquet", "csv"):
        raise ValueError(f"--format {fmt!r}: use parquet or csv")
    check_output_file(path, flag="--out", suffixes=tuple(OUTPUT_SUFFIXES))
    by_suffix = OUTPUT_SUFFIXES[path.suffix.lower()]
    if fmt is not None and fmt != by_suffix:
        raise ValueError(f"--format {fmt} does not match --out {path} ({path.suffix} is {by_suffix}); "
                         f"name the file {path.with_suffix('.' + fmt).name}, or drop --format")
    return by_suffix


@dataclass
class History:
    table: pa.Table  # SCHEMA, sorted by ts
    chains: pa.Table  # one row per fraud chain: chain_id, card (index), start_ts, length, fast
    chain_of_row: np.ndarray  # per row of `table`: chain id, or -1 for rows not in a chain
    summary: dict
    #: one row per compromised-merchant episode: episode_id, merchant, start_day, end_day, customers, victims
    episodes: pa.Table | None = None
    episode_of_row: np.ndarray | None = None  # per row: episode id, or -1
    kind_of_row: np.ndarray | None = None  # per row: index into KINDS (0 legitimate)

    def fraud_kinds(self) -> pa.Table:
        """The side file's rows: each fraud row's txn_id and kind, in the table's order."""
        fraud = np.flatnonzero(self.kind_of_row > 0)
        kinds = pa.array(list(KINDS), pa.string()).take(pa.array(self.kind_of_row[fraud]))
        return pa.table({"txn_id": self.table.column("txn_id").take(pa.array(fraud)), "kind": kinds},
                        schema=KINDS_SCHEMA)


def fraud_kinds_path(out: Path) -> Path:
    """Where the side file of a history goes: next to it, `<stem>.fraud_kinds.parquet`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.fraud_kinds.parquet")


def write_fraud_kinds(hist: History, out: Path) -> Path:
    """Write the side file of the history written to `out` (txn_id, kind); returns its path."""
    path = fraud_kinds_path(out)
    write_history(hist.fraud_kinds(), path, "parquet")
    return path


def summary_line(s: dict) -> str:
    """The fraud part of `velocity generate`'s summary: rows, rate, and rows by kind."""
    return (f"fraud {s['fraud_rows']:,} rows ({s['fraud_rate']:.3%}): card chains {s['chain_rows']:,} rows in "
            f"{s['chains']:,} chains, compromised merchants {s['compromised_rows']:,} rows in {s['episodes']:,} "
            f"episodes")


def generate_history(cfg: GenerateConfig, progress: Callable[[str, float], None] | None = None) -> History:
    cfg.validate()
    step = progress or (lambda _label, _frac: None)
    rng = np.random.default_rng(cfg.seed)
    start_ms = _midnight_ms(cfg.start)
    span_ms = cfg.days * DAY_MS

    step("card and merchant profiles (Faker)", 0.0)
    prof = make_profiles(cfg.cards, rng, cfg.seed, cfg.mean_rate_per_day)

    step("legitimate transactions", 0.15)
    counts = rng.poisson(prof.rate_per_day * cfg.days)
    card = np.repeat(np.arange(cfg.cards, dtype=np.int32), counts)
    n = card.size
    day = rng.integers(0, cfg.days, n)
    hour = rng.choice(24, n, p=HOURLY / HOURLY.sum())
    ts = start_ms + day * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, n)
    z = rng.standard_normal(n)
    amount = np.exp(prof.amount_mu[card] + prof.amount_sigma[card] * z)
    amount = np.clip(np.round(amount, 2), 1.0, 25_000.0)
    home = rng.random(n) < 0.8
    merchant = np.where(home, prof.home_merchants[card, rng.integers(0, prof.home_merchants.shape[1], n)],
                        rng.integers(0, len(prof.merchant_names), n))

    step("fraud chains", 0.45)
    mean_len = (cfg.chain_min + cfg.chain_max) / 2
    n_chains = int(round(cfg.fraud_rate / (1 - cfg.fraud_rate) * n / mean_len))
    lengths = rng.integers(cfg.chain_min, cfg.chain_max + 1, n_chains)
    fast = rng.random(n_chains) < cfg.fast_share
    victims = rng.integers(0, cfg.cards, n_chains).astype(np.int32)
    chain_start = start_ms + rng.integers(0, max(span_ms - 3_600_000, 1), n_chains)
    f_chain = np.repeat(np.arange(n_chains), lengths)
    f_pos = np.arange(f_chain.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    gap_lo = np.where(fast[f_chain], 1.0, cfg.gap_min_s)
    gap_hi = np.where(fast[f_chain], min(10.0, cfg.gap_max_s), cfg.gap_max_s)
    gaps_ms = np.round(rng.uniform(gap_lo, gap_hi) * 1000).astype(np.int64)
    gaps_ms[f_pos == 0] = 0
    offsets = np.cumsum(gaps_ms)
    offsets -= np.repeat(offsets[np.cumsum(lengths) - lengths], lengths)
    f_ts = chain_start[f_chain] + offsets
    testing = rng.random(f_chain.size) < 0.55  # card testing: small; cash-out: large
    f_amount = np.where(testing, rng.uniform(1.0, 50.0, f_chain.size), rng.lognormal(5.8, 0.7, f_chain.size))
    f_amount = np.clip(np.round(f_amount, 2), 1.0, 25_000.0)
    f_card = victims[f_chain]
    f_merchant = rng.integers(0, len(prof.merchant_names), f_chain.size)

    step("compromised merchants", 0.5)
    merchants = len(prof.merchant_names)
    total_rate = cfg.fraud_rate + cfg.compromise_rate
    ep = make_episodes(rng, card=card, merchant=merchant, amount=amount, cards=cfg.cards, merchants=merchants,
                       start_ms=start_ms, days=cfg.days,
                       target_rows=int(round(cfg.compromise_rate / (1 - total_rate) * n)),
                       card_share=cfg.compromise_card_share, days_min=cfg.compromise_days_min,
                       days_max=cfg.compromise_days_max, per_card_max=cfg.compromise_per_card_max, hourly=HOURLY)

    step("sorting by event time", 0.6)
    all_card = np.concatenate([card, f_card, ep.row_card])
    all_ts = np.concatenate([ts, f_ts, ep.row_ts])
    all_amount = np.concatenate([amount, f_amount, ep.row_amount])
    all_merchant = np.concatenate([merchant, f_merchant, ep.merchant[ep.row_episode]])
    none = np.full(ep.rows, -1, dtype=np.int64)
    chain_of_row = np.concatenate([np.full(n, -1, dtype=np.int64), f_chain, none])
    episode_of_row = np.concatenate([np.full(n + f_chain.size, -1, dtype=np.int64), ep.row_episode])
    kind = np.concatenate([np.zeros(n, np.int8), np.ones(f_chain.size, np.int8), np.full(ep.rows, 2, np.int8)])
    order = np.argsort(all_ts, kind="stable")
    # Drawn last, so legitimate rows and chains do not depend on them: when each fraud's label becomes known.
    delays = label_delays_ms(rng, int(kind.size), min_days=cfg.label_delay_min_days,
                             typical_days=cfg.label_delay_typical_days, max_days=cfg.label_delay_max_days,
                             tail_share=cfg.label_delay_tail_share)
    labeled_at = pa.array(all_ts + delays, pa.int64(), mask=kind == 0)

    step("building the table", 0.75)
    n_all = order.size
    ids = pc.binary_join_element_wise(pa.scalar(f"t{cfg.seed}-"), pc.cast(pa.array(np.arange(n_all)), pa.string()), "")
    pans = pa.array(prof.pans.tolist(), pa.string())
    names = pa.array(prof.merchant_names.tolist(), pa.string())
    cats = pa.array(prof.merchant_categories.tolist(), pa.string())
    m_sorted = pa.array(all_merchant[order])
    table = pa.table({
        "txn_id": ids,
        "cc_num": pans.take(pa.array(all_card[order])),
        "amount": pa.array(all_amount[order]),
        "ts": pa.array(all_ts[order].astype(np.int64)),
        "merchant": names.take(m_sorted),
        "category": cats.take(m_sorted),
        "fraud_label": pa.array((kind[order] > 0).astype(np.int8)),
        "labeled_at": labeled_at.take(pa.array(order)),
    }, schema=SCHEMA)
    chains = pa.table({"chain_id": np.arange(n_chains), "card": victims, "start_ts": chain_start,
                       "length": lengths, "fast": fast})
    episodes = pa.table({"episode_id": np.arange(ep.merchant.size), "merchant": names.take(pa.array(ep.merchant)),
                         "start_day": ep.start_day, "end_day": ep.end_day, "customers": ep.customers,
                         "victims": ep.victims})
    fraud_rows = int(f_chain.size + ep.rows)
    summary = {
        "rows": n_all, "cards": int(cfg.cards), "fraud_rows": fraud_rows, "chains": int(n_chains),
        "chain_rows": int(f_chain.size), "episodes": int(ep.merchant.size), "compromised_rows": ep.rows,
        "fraud_rate": float(fraud_rows / n_all) if n_all else 0.0,
        "first_ts": int(all_ts.min()) if n_all else None, "last_ts": int(all_ts.max()) if n_all else None,
    }
    step("done", 1.0)
    return History(table, chains, chain_of_row[order], summary, episodes, episode_of_row[order], kind[order])


def write_history(table: pa.Table, path: Path, fmt: str | None = None) -> str:
    """Write Parquet (default) or CSV, atomically (temp file + rename). Returns the format used."""
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "parquet")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp, compression="zstd", row_group_size=1_000_000)
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a failed write leaves no temp file behind
    return fmt
