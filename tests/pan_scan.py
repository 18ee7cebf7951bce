"""A scanner for full card numbers, written from the SPEC's words alone (section 3: stores, Kafka and logs use the
entity key or a masked PAN, never the clear PAN; issue 17: scan for the 16-digit PANs of the history, also with
separators removed). It imports nothing from the product.

Each item (a log line, a Redis key with its value, an archive row, a Kafka message) is searched for every PAN of
the history as written, and again after removing the separators people and formatters put inside card numbers
(spaces, dashes, dots, slashes, underscores, colons, commas, pipes): `4539 5787 6362 1486` is still that card.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

SEPARATORS = re.compile(r"[\s\-./_:,|]+")


def _text(item: bytes | str | object) -> str:
    if isinstance(item, bytes):
        return item.decode("latin-1")  # every byte maps to one character: digits stay digits, nothing is lost
    return item if isinstance(item, str) else repr(item)


@dataclass
class PanScanner:
    """Finds the history's PANs in whatever it is given; `hits` records (where, masked PAN) for the report."""

    pans: frozenset[str]
    hits: list[tuple[str, str]] = field(default_factory=list)
    scanned: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.pans if not (len(p) == 16 and p.isdigit())]
        assert not bad, f"expected 16-digit PANs, got {len(bad)} others"
        self._any = re.compile("|".join(sorted(self.pans)))

    def find(self, item: bytes | str | object) -> set[str]:
        """The PANs in one item: as written, or once its separators are removed."""
        text = _text(item)
        found = set(self._any.findall(text))
        squeezed = SEPARATORS.sub("", text)
        if squeezed != text:
            found |= set(self._any.findall(squeezed))
        return found

    def scan(self, where: str, items: Iterable[bytes | str | object]) -> int:
        """Scan each item; record hits (PANs masked in the record). Returns how many items were scanned."""
        n = 0
        for item in items:
            n += 1
            for pan in self.find(item):
                self.hits.append((where, "*" * 12 + pan[-4:]))
        self.scanned += n
        return n

    def report(self) -> str:
        places: dict[str, int] = {}
        for where, _ in self.hits:
            places[where] = places.get(where, 0) + 1
        return ", ".join(f"{where}: {n}" for where, n in sorted(places.items()))
