"""PAN masking of card numbers printed in groups (`4539 5787 6362 1486`, `4539-5787-6362-1486`).

The oracle is the SPEC's rule alone (sections 2 and 3: a clear PAN is never stored or logged): after masking, the
digits of the PAN, read with the separators dropped, no longer appear; the last 4 digits may stay.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.entity import redact_pans, redact_pans_bytes
from featurestore.events import dead_letter

pytestmark = pytest.mark.unit


def luhn_complete(body: str) -> str:
    """Append the Luhn check digit (written from the algorithm, not the product's helper)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


pans = st.integers(min_value=12, max_value=18).flatmap(
    lambda n: st.text("0123456789", min_size=n, max_size=n)).map(luhn_complete)


def grouped(pan: str, sizes: list[int], seps: list[str]) -> str:
    out, i, k = [], 0, 0
    while i < len(pan):
        size = sizes[k % len(sizes)]
        out.append(pan[i:i + size])
        i += size
        k += 1
    text = out[0]
    for j, part in enumerate(out[1:]):
        text += seps[j % len(seps)] + part
    return text


def digits_only(text: str) -> str:
    return text.replace(" ", "").replace("-", "")


@settings(max_examples=300, deadline=None)
@given(pan=pans, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       seps=st.lists(st.sampled_from(["", " ", "-"]), min_size=1, max_size=4),
       before=st.text("abcxyz :/_", max_size=8), after=st.text("abcxyz :/_", max_size=8))
def test_a_grouped_pan_never_survives(pan, sizes, seps, before, after):
    text = f"{before} {grouped(pan, sizes, seps)} {after}"
    masked = redact_pans(text)
    assert len(masked) == len(text)
    assert pan[:-4] not in digits_only(masked)
    raw = text.encode()
    assert pan[:-4].encode() not in digits_only(redact_pans_bytes(raw).decode()).encode()


@pytest.mark.parametrize("text", ["4539 5787 6362 1486", "4539-5787-6362-1486", "card: 4539 5787 6362 1486 exp",
                                  "4539 5787 6362 1486 123", "5 4539 5787 6362 1486"])
def test_printed_card_numbers_are_masked(text):
    assert "4539578763621" not in digits_only(redact_pans(text))


@pytest.mark.parametrize("text", ["order 2024-11-30", "call 555 1234", "1764460000000", "a 1 2 3 4 5",
                                  "4539578763621487"])  # a date, a phone, a time, stray digits, a bad Luhn digit
def test_what_is_not_a_pan_is_left_alone(text):
    assert redact_pans(text) == text


def test_a_pan_joined_by_a_dash_to_a_digit_is_masked_with_it():
    """Seen in CI: the topic name "...-4012888888881881-3e91eff8" holds the grouped run "4012888888881881-3", 17
    digits with a valid Luhn digit, so that run is the one masked (its last 4 digits kept): the PAN is masked still."""
    text = "test.hostile-4012888888881881-3e91eff8"
    masked = redact_pans(text)
    assert masked == "test.hostile-*************881-3e91eff8"
    assert "4012888888881881"[:-3] not in digits_only(masked)


def test_a_dead_letter_masks_a_grouped_pan():
    value = b'{"txn_id": "t1", "merchant": "shop 4539-5787-6362-1486", "amount": "x"}'
    key, copy, _ = dead_letter(value, b"4539 5787 6362 1486", reason="bad_amount", detail="d", topic="t",
                                   partition=0, offset=1)
    assert b"4539578763621" not in digits_only(copy.decode()).encode()
    assert len(copy) == len(value)
    assert b"4539578763621" not in digits_only(key.decode()).encode()


def digit_run_of_13(text: str) -> bool:
    """The pre-check's rule from its words: 13 or more ASCII digits in a row, one space or dash allowed between two
    digits (written as a scan, not a regular expression)."""
    digits = "0123456789"
    for start, ch in enumerate(text):
        if ch not in digits:
            continue
        n, i = 1, start + 1
        while n < 13 and i < len(text):
            if text[i] in digits:
                n, i = n + 1, i + 1
            elif text[i] in " -" and i + 1 < len(text) and text[i + 1] in digits:
                i += 1
            else:
                break
        if n >= 13:
            return True
    return False


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="0123456789 -a-\u0663", max_size=40))
def test_the_digit_run_pre_check_finds_exactly_the_runs(text):
    """`has_digit_run` (two regular expressions, the cheap one first) says yes exactly when such a run exists:
    what it misses is never masked."""
    from featurestore.entity import has_digit_run

    assert has_digit_run(text) == digit_run_of_13(text), text


def luhn_ok(digits: str) -> bool:
    """The Luhn check from its definition: from the right, every second digit doubled (minus 9 above 9)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def masked_by_rule(run: str) -> str:
    """A run of digit groups masked as the rule says, by brute force: plain digits are a PAN when 13-19 long and
    Luhn-valid; in a grouped run, from the leftmost group on, the longest sequence of whole groups holding 13-19
    digits that is Luhn-valid is a PAN (its digits but the last 4 become `*`) and the search goes on after it;
    a group that starts none is passed over."""
    groups = run.replace("-", " ").split(" ")
    seps = [c for c in run if c in " -"]
    masked = list(groups)
    if len(groups) == 1:
        starts_at = [0] if 13 <= len(run) <= 19 and luhn_ok(run) else []
        ends_at = {0: 0}
    else:
        starts_at, ends_at, i = [], {}, 0
        while i < len(groups):
            found = None
            for j in range(i, len(groups)):
                digits = "".join(groups[i:j + 1])
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    found = j
            if found is None:
                i += 1
            else:
                starts_at.append(i)
                ends_at[i] = found
                i = found + 1
    for i in starts_at:
        keep = 4  # the last 4 digits of the span stay, wherever the groups split them
        for g in range(ends_at[i], i - 1, -1):
            n = len(masked[g])
            shown = min(keep, n)
            masked[g] = "*" * (n - shown) + masked[g][n - shown:]
            keep -= shown
    return masked[0] + "".join(s + g for s, g in zip(seps, masked[1:], strict=True))


@settings(max_examples=2000, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=14), seps=st.lists(st.sampled_from(" -"), min_size=1),
       seed=st.integers(0, 2**32 - 1))
def test_grouped_runs_are_masked_as_the_rule_says(sizes, seps, seed):
    """Which spans of a grouped run are masked equals the brute-force reading of the rule (the masker sums Luhn
    terms from prefix sums, which a wrong parity or an off-by-one group would break)."""
    import random

    rng = random.Random(seed)
    groups = ["".join(rng.choice("0123456789") for _ in range(n)) for n in sizes]
    run = groups[0] + "".join(seps[k % len(seps)] + g for k, g in enumerate(groups[1:]))
    assert redact_pans(f"<{run}>") == f"<{masked_by_rule(run)}>", run


def test_a_hostile_run_of_tiny_groups_is_masked_quickly():
    """A dead letter of 1 MB of "1-1-1-..." is bounded work. No 13-19 ones pass the Luhn check, so a candidate span
    starts at every group and none ends the search early: each costs constant time (the masker took ~1.5 s per such
    dead letter when each candidate's digits were joined and checked afresh)."""
    import time

    from featurestore.events import DLQ_MAX_VALUE_BYTES

    assert not any(luhn_ok("1" * n) for n in range(13, 20))
    value = b"1-" * 500_000
    start = time.perf_counter()
    _, copy, _ = dead_letter(value, None, reason="r", detail="d", topic="t", partition=0, offset=1)
    elapsed = time.perf_counter() - start
    assert copy == value[:DLQ_MAX_VALUE_BYTES]
    assert elapsed < 0.5, f"{elapsed:.2f} s for one dead letter"
