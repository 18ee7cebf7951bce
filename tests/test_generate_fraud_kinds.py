"""The generator's compromised merchants, label delays and fraud-kind side file (issue 16, item 4).

Every oracle below is computed from the generated table itself, by the issue's words: while a merchant is
compromised, a share of the cards that use it (its customers in the history) have fraudulent transactions AT that
merchant, with amounts like that merchant's usual ones, all labeled 1, no legitimate row changed; each fraud row's
label is known `labeled_at` = ts + a delay (most within 1-14 days, a tail to 60), legitimate rows never.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ingest.generate import GenerateConfig, generate_history, write_fraud_kinds, write_history
from tests.conftest import REPO

DAY_MS = 86_400_000
#: Episodes dense enough to measure at small scale: 30% of each compromised merchant's customers hit.
DENSE = GenerateConfig(cards=600, days=40, start=dt.date(2020, 1, 1), seed=11, compromise_rate=0.004,
                       compromise_card_share=0.3, compromise_days_min=4, compromise_days_max=9)


@pytest.fixture(scope="module")
def dense():
    return generate_history(DENSE)


def _frame(hist):
    return hist.table.to_pandas()


@pytest.mark.unit
def test_compromised_merchants_hit_the_configured_share_of_their_customers(dense) -> None:
    df = _frame(dense)
    kind = dense.kind_of_row
    legit, comp = df[df.fraud_label == 0], df[kind == 2]
    assert len(comp) > 50 and (comp.fraud_label == 1).all()
    customers = legit.groupby("merchant")["cc_num"].agg(set)
    victims = comp.groupby("merchant")["cc_num"].agg(set)
    assert len(victims) >= 3, "several merchants are compromised"
    hit = total = 0
    for merchant, cards in victims.items():
        assert cards <= customers[merchant], "only the merchant's own customers are defrauded there"
        hit, total = hit + len(cards), total + len(customers[merchant])
        rows = comp[comp.merchant == merchant]
        # one window of at most compromise_days_max whole days per merchant
        days = (rows.ts // DAY_MS).to_numpy()
        assert days.max() - days.min() < DENSE.compromise_days_max
        assert rows.groupby("cc_num").size().max() <= DENSE.compromise_per_card_max
        # amounts like the merchant's usual ones: each one is an amount a customer paid there legitimately
        assert set(rows.amount) <= set(legit[legit.merchant == merchant].amount)
    assert 0.22 < hit / total < 0.38, hit / total  # configured 0.3 of the customers


@pytest.mark.unit
def test_episodes_change_no_legitimate_row_and_no_chain() -> None:
    without = generate_history(GenerateConfig(**{**DENSE.__dict__, "compromise_rate": 0.0}))
    with_ = generate_history(DENSE)
    assert (without.kind_of_row != 2).all() and (with_.kind_of_row == 2).any()
    cols = ["cc_num", "amount", "ts", "merchant", "category"]
    for kind in (0, 1):  # legitimate rows and card chains, row for row
        a = without.table.filter(without.kind_of_row == kind).select(cols).sort_by([("ts", "ascending"),
                                                                                    ("cc_num", "ascending")])
        b = with_.table.filter(with_.kind_of_row == kind).select(cols).sort_by([("ts", "ascending"),
                                                                                ("cc_num", "ascending")])
        assert a.equals(b), kind


@pytest.mark.unit
def test_label_delays_are_within_bounds_and_legitimate_rows_are_never_labeled() -> None:
    hist = generate_history(GenerateConfig(cards=2000, days=60, start=dt.date(2020, 1, 1), seed=4))
    t = hist.table
    fraud = pc.equal(t.column("fraud_label"), 1)
    legit_labeled = t.filter(pc.invert(fraud)).column("labeled_at")
    assert legit_labeled.null_count == len(legit_labeled)
    f = t.filter(fraud)
    delay_days = (f.column("labeled_at").to_numpy() - f.column("ts").to_numpy()) / DAY_MS
    assert f.column("labeled_at").null_count == 0 and delay_days.size > 500
    assert delay_days.min() >= 1 - 1e-9 and delay_days.max() <= 60 + 1e-9
    assert np.mean(delay_days <= 14) > 0.8  # most within 1-14 days
    assert np.mean(delay_days > 14) > 0.03  # and a tail beyond
    again = generate_history(GenerateConfig(cards=2000, days=60, start=dt.date(2020, 1, 1), seed=4)).table
    assert again.column("labeled_at").equals(t.column("labeled_at"))  # reproducible with --seed


@pytest.mark.unit
def test_the_suggested_rate_gives_a_real_share_of_compromised_merchant_fraud() -> None:
    # Episodes are opt-in until the served registry holds the merchant groups (issue 16); 0.0008 is the rate the
    # help text suggests.
    hist = generate_history(GenerateConfig(cards=3000, compromise_rate=0.0008))  # the default 152 days
    labels = hist.table.column("fraud_label").to_numpy()
    share = np.mean(hist.kind_of_row[labels == 1] == 2)
    assert 0.15 < share < 0.45, share
    assert 0.0025 <= labels.mean() <= 0.0038, labels.mean()


@pytest.mark.unit
def test_side_file_names_every_fraud_row_and_its_kind(dense, tmp_path) -> None:
    out = tmp_path / "h.parquet"
    write_history(dense.table, out)
    side = write_fraud_kinds(dense, out)
    assert side == tmp_path / "h.fraud_kinds.parquet"
    kinds = pq.read_table(side).to_pandas()
    df = pq.read_table(out).to_pandas()
    fraud = df[df.fraud_label == 1]
    assert sorted(kinds.txn_id) == sorted(fraud.txn_id)
    assert set(kinds.kind) == {"card_chain", "compromised_merchant"}
    merged = fraud.merge(kinds, on="txn_id")
    # a card chain is minutes apart on one card; a compromised merchant's rows share the merchant, days apart
    chain_cards = merged[merged.kind == "card_chain"].groupby("cc_num").size()
    assert (chain_cards >= DENSE.chain_min).all()


@pytest.mark.integration
def test_generate_cli_writes_the_side_file_and_reports_fraud_by_kind(tmp_path) -> None:
    out = tmp_path / "g.parquet"
    res = subprocess.run([sys.executable, "-m", "velocity_cli", "generate", "--out", str(out), "--cards", "300",
                          "--days", "20", "--fraud-rate", "0.01", "--compromise-rate", "0.003"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stderr.split())
    assert "card chains" in text and "compromised merchants" in text and "episodes" in text, text
    kinds = pq.read_table(tmp_path / "g.fraud_kinds.parquet")
    table = pq.read_table(out)
    assert kinds.num_rows == pc.sum(table.column("fraud_label")).as_py()
    assert table.schema.field("labeled_at").type == "int64"


@pytest.mark.unit
def test_a_history_may_carry_labeled_at_but_only_as_epoch_ms(dense, tmp_path) -> None:
    import pyarrow as pa

    from stores.history import HistoryError, load_history

    t = dense.table.slice(0, 40)
    ok = tmp_path / "ok.parquet"
    pq.write_table(t, ok)  # int64 with nulls: fine
    assert load_history(ok).column("labeled_at").type == pa.int64()
    pq.write_table(t.drop(["labeled_at"]), tmp_path / "none.parquet")  # optional: a history without it loads
    load_history(tmp_path / "none.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("labeled_at"), "labeled_at",
                                pa.array(["soon"] * t.num_rows)), bad)
    with pytest.raises(HistoryError, match=r"labeled_at should be integer"):
        load_history(bad)
