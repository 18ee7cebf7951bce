"""Small synthetic transaction histories that stress window semantics (bursts, ties, edges, disorder)."""

from __future__ import annotations

import numpy as np
import orjson

from tests.oracle import Arrival

W = 600_000
T0 = 1_577_836_800_000  # 2020-01-01


def luhn_pan(rng: np.random.Generator) -> str:
    digits = [4] + list(rng.integers(0, 10, 14))
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = int(d)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def history(n: int = 3000, cards: int = 40, seed: int = 7, disorder: int = 30, late: int = 10,
            mean_gap_ms: float = 20_000) -> list[dict]:
    """Rows in stream order: mostly by ts, with bursts, exact ties, exact 10-minute edges, a few
    out-of-order rows within the allowed lateness and `late` rows far beyond it."""
    rng = np.random.default_rng(seed)
    pans = [luhn_pan(rng) for _ in range(cards)]
    rows: list[dict] = []
    t = T0
    while len(rows) < n:
        card = int(rng.integers(cards))
        kind = rng.random()
        if kind < 0.15:  # burst of 3-8 within seconds, some ties
            k = int(rng.integers(3, 9))
            times = t + np.sort(rng.integers(0, 5, k)) * 1000
        elif kind < 0.25:  # exact window edge pair
            times = np.array([t, t + W])
        else:
            times = np.array([t])
        for ts in times:
            rows.append({"card": card, "ts": int(ts)})
        t += int(rng.exponential(mean_gap_ms))
    rows = sorted(rows[:n], key=lambda r: r["ts"])  # stable: ties keep creation order
    # Disorder: move a few rows later in the stream, but within the allowed lateness.
    for _ in range(disorder):
        i = int(rng.integers(0, len(rows) - 5))
        row = rows.pop(i)
        rows.insert(i + int(rng.integers(1, 5)), row)
    # Late: rows whose ts is far behind their card's present.
    for _ in range(late):
        i = int(rng.integers(len(rows) // 2, len(rows)))
        rows.insert(i, {"card": rows[i]["card"], "ts": rows[i]["ts"] - 3 * W})
    out = []
    for i, r in enumerate(rows):
        amount = round(float(rng.lognormal(3, 1)) + 0.01, 2)
        out.append({"txn_id": f"s{seed}-{i:06d}", "cc_num": pans[r["card"]], "amount": amount, "ts": r["ts"],
                    "merchant": f"m{int(rng.integers(50))}", "category": "grocery_pos",
                    "fraud_label": int(rng.random() < 0.01)})
    return out


def arrivals(rows: list[dict], keyer) -> list[Arrival]:
    return [Arrival(keyer(r["cc_num"]), r["txn_id"], r["ts"], round(r["amount"] * 100)) for r in rows]


def message(row: dict, keyer, send_pan: bool = False) -> bytes:
    """A row as Velocity's producers send it (SPEC section 2): `card` (entity key) and `pan_last4`, no PAN.

    send_pan=True sends the row as it is, with `cc_num`, as an outside producer may.
    """
    if send_pan:
        return orjson.dumps(row)
    d = {k: v for k, v in row.items() if k != "cc_num"}
    d["card"], d["pan_last4"] = keyer(row["cc_num"]), row["cc_num"][-4:]
    return orjson.dumps(d)


def produce(bootstrap: str, topic: str, rows: list[dict], keyer, extra: list[tuple[bytes, bytes]] = (),
            send_pan: bool = False) -> None:
    """Rows in list order, keyed by entity key, as `velocity replay` sends them (or with cc_num: send_pan)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    for r in rows:
        p.send(topic, key=keyer(r["cc_num"]).encode(), value=message(r, keyer, send_pan), timestamp_ms=r["ts"])
    for key, value in extra:
        p.send(topic, key=key, value=value)
    p.flush(timeout=60)
    p.close()
