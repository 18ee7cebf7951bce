"""`velocity dlq replay`: send dead letters back to the transactions topic once the cause is fixed.

Each dead letter is validated again with today's code and settings (a clock that was far off, a bound that was
too tight, a producer bug fixed upstream): what passes now is re-sent as Velocity's producers write it (entity
key and last four digits, never a PAN) with a `replayed_from` header naming its source; what still fails is
counted by reason and stays in the dead-letter topic. A truncated copy (the original was over the copy limit)
cannot be replayed and is counted as such. Progress is a consumer group's committed offsets, so a second run
resends nothing; the stream worker deduplicates by `txn_id` anyway. `--dry-run` reads and reports only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from featurestore.entity import EntityKeyer
from featurestore.events import InvalidEvent, parse_transaction

log = logging.getLogger(__name__)

DEFAULT_GROUP = "velocity-dlq-replay"
#: Late events were archived and scored as late already; sending them again changes nothing unless asked.
DEFAULT_SKIP_REASONS = frozenset({"late"})


@dataclass
class DlqReport:
    read: int = 0
    replayed: int = 0
    skipped: Counter = field(default_factory=Counter)  # by original reason, not selected
    still_invalid: Counter = field(default_factory=Counter)  # by today's reason
    truncated: int = 0

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would be replayed" if dry_run else "replayed"
        out = [f"{self.read:,} dead letters read; {self.replayed:,} {verb}"]
        if self.truncated:
            out.append(f"{self.truncated:,} truncated copies (original over the copy limit): re-send from the source")
        for reason, n in sorted(self.still_invalid.items()):
            out.append(f"{n:,} still invalid ({reason})")
        for reason, n in sorted(self.skipped.items()):
            out.append(f"{n:,} skipped (reason {reason}; select it with --reason {reason})")
        return out


def _header(headers: Iterable[tuple[str, bytes]] | None, name: str) -> str:
    for key, value in headers or ():
        if key == name:
            return value.decode("utf-8", "replace")
    return ""


def replay_dead_letters(bootstrap: str, dlq_topic: str, topic: str, *, keyer: EntityKeyer, max_future_ms: int,
                        reasons: frozenset[str] | None = None, dry_run: bool = False, group: str = DEFAULT_GROUP,
                        idle_s: float = 3.0, progress: Callable[[int], None] = lambda n: None) -> DlqReport:
    """Read the dead-letter topic from the group's position to its end and re-send what validates now.

    `reasons` selects dead letters by their original reason (None: every reason but DEFAULT_SKIP_REASONS).
    Offsets are committed only after every re-sent message is acknowledged, and never in a dry run.
    """
    from kafka import KafkaConsumer, KafkaProducer

    from stores.kafka_security import kafka_python_kwargs

    security = kafka_python_kwargs()
    consumer = KafkaConsumer(dlq_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=int(idle_s * 1000),
                             max_poll_records=2_000, **security)
    producer = None if dry_run else KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                                  linger_ms=20, **security)
    report = DlqReport()
    try:
        for msg in consumer:
            report.read += 1
            reason = _header(msg.headers, "reason")
            if (reasons is not None and reason not in reasons) or (reasons is None and reason in DEFAULT_SKIP_REASONS):
                report.skipped[reason or "none"] += 1
                continue
            if _header(msg.headers, "truncated") == "1":
                report.truncated += 1
                continue
            try:
                txn = parse_transaction(msg.value, keyer, int(time.time() * 1000), max_future_ms)
            except InvalidEvent as exc:
                report.still_invalid[exc.reason] += 1
                continue
            report.replayed += 1
            if producer is not None:
                source = _header(msg.headers, "source") or f"{dlq_topic}/{msg.partition}/{msg.offset}"
                producer.send(topic, key=txn.card.encode(), value=txn.to_json(),
                              headers=[("replayed_from", source.encode())])
            if report.read % 1_000 == 0:
                progress(report.read)
        if producer is not None:
            producer.flush()
            consumer.commit()  # after every re-sent message is acknowledged: a crash before resends, never loses
    finally:
        if producer is not None:
            producer.close()
        consumer.close()
    log.info("dlq replay: %s", "; ".join(report.lines(dry_run)))
    return report
