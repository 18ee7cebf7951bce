"""`velocity generate` and `velocity replay`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True)


def _parse_date(value: str, flag: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected YYYY-MM-DD, got {value!r}", param_hint=flag) from None


dlq_app = typer.Typer(help="Dead letters: malformed or refused transactions the stream worker set aside.",
                      no_args_is_help=True)


@dlq_app.command("replay")
def dlq_replay(
    dry_run: bool = typer.Option(False, help="Read and report what would be replayed; send and commit nothing."),
    reason: list[str] = typer.Option(None, help="Replay only dead letters with this original reason (repeatable; "
                                     "default: every reason but `late`, which was archived as late already)."),
    dlq_topic: str = typer.Option(None, help="Dead-letter topic (default VELOCITY_KAFKA_TOPIC_DLQ)."),
    topic: str = typer.Option(None, help="Where replayed transactions go (default VELOCITY_KAFKA_TOPIC_TRANSACTIONS)."),
    group: str = typer.Option("velocity-dlq-replay", help="Consumer group keeping the replay's position: a second "
                              "run starts where the first ended."),
) -> None:
    """Validate every dead letter again with today's code and settings and re-send those that pass (as entity key
    and last four digits); the rest stay and are counted by reason. Run after fixing the cause (a producer bug, a
    clock that was off, a bound that was too tight)."""
    from featurestore.config import get_settings
    from featurestore.entity import EntityKeyer
    from ingest.dlq import replay_dead_letters

    s = get_settings()
    _check_kafka_credentials(s.kafka.bootstrap)
    report = replay_dead_letters(s.kafka.bootstrap, dlq_topic or s.kafka.topic_dlq,
                                 topic or s.kafka.topic_transactions, keyer=EntityKeyer(s.entity_secret),
                                 max_future_ms=s.max_future_ms, reasons=frozenset(reason) if reason else None,
                                 dry_run=dry_run, group=group,
                                 progress=lambda n: err.print(f"{n:,} dead letters read"))
    for line in report.lines(dry_run):
        err.print(line, soft_wrap=True, highlight=False)


def _check_kafka_credentials(bootstrap: str) -> None:
    """Refused Kafka credentials (SASL) or inconsistent security settings: one clear line and exit 2."""
    from stores.kafka_security import KafkaSecurityError, check_credentials

    try:
        check_credentials(bootstrap)
    except KafkaSecurityError as exc:
        from rich.markup import escape

        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")

    @app.command()
    def generate(
        out: Path = typer.Option(Path("data/history.parquet"),
                                 help="Output file: .parquet, or .csv for CSV (other extensions are refused)."),
        cards: int = typer.Option(10_000, help="Number of cards (at least 1)."),
        days: int = typer.Option(152, help="Days of history (at least 1)."),
        start: str = typer.Option("2020-01-01", help="First day (UTC), YYYY-MM-DD: not before 2000-01-01, and the "
                                  "last day at most VELOCITY_MAX_FUTURE_MS (default 1 day) ahead of now, the "
                                  "event times the stream worker accepts."),
        seed: int = typer.Option(42, help="Random seed: same seed and flags give a byte-identical file."),
        fraud_rate: float = typer.Option(0.0025, help="Share of rows that are fraud-chain transactions."),
        chain_min: int = typer.Option(3, help="Shortest fraud chain (extra transactions on the victim card)."),
        chain_max: int = typer.Option(10, help="Longest fraud chain."),
        chain_gap_min_s: float = typer.Option(30.0, help="Shortest gap between chain transactions (s)."),
        chain_gap_max_s: float = typer.Option(120.0, help="Longest gap between chain transactions (s)."),
        compromise_rate: float = typer.Option(0.0008, help="Share of rows that are compromised-merchant fraud "
                                              "(0.0008: ~24% of fraud rows at seed scale; 0 turns episodes "
                                              "off)."),
        compromise_card_share: float = typer.Option(0.25, help="Share of a compromised merchant's customers that "
                                                    "get fraudulent transactions there."),
        compromise_days_min: int = typer.Option(2, help="Shortest compromised-merchant episode (days)."),
        compromise_days_max: int = typer.Option(7, help="Longest compromised-merchant episode (days)."),
        fmt: str = typer.Option(None, "--format", help="parquet or csv (default: from the file suffix, which "
                                "must match)."),
    ) -> None:
        """Generate a realistic card-transaction history with Faker profiles (vectorized; ~10 s at default scale)."""
        import time

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from ingest.generate import GenerateConfig, generate_history, summary_line, write_fraud_kinds, write_history

        cfg = GenerateConfig(cards=cards, days=days, start=_parse_date(start, "--start"), seed=seed,
                             fraud_rate=fraud_rate, chain_min=chain_min, chain_max=chain_max,
                             gap_min_s=chain_gap_min_s, gap_max_s=chain_gap_max_s, compromise_rate=compromise_rate,
                             compromise_card_share=compromise_card_share, compromise_days_min=compromise_days_min,
                             compromise_days_max=compromise_days_max)
        from rich.markup import escape

        from featurestore.config import get_settings
        from ingest.generate import output_format

        try:  # everything that can be refused is refused before generating
            cfg.validate(now_ms=int(time.time() * 1000), max_future_ms=get_settings().max_future_ms)
            fmt = output_format(out, fmt)
        except ValueError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description:<36}"), BarColumn(), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("generating", total=1.0)
            hist = generate_history(cfg, progress=lambda label, frac: bar.update(task, description=label,
                                                                                   completed=frac))
            bar.update(task, description=f"writing {out}", completed=0.95)
            used = write_history(hist.table, out, fmt)
            kinds = write_fraud_kinds(hist, out)  # each fraud row's kind, for the model report's breakdown
            bar.update(task, description="done", completed=1.0)
        s = hist.summary
        first = dt.datetime.fromtimestamp(s["first_ts"] / 1000, dt.UTC) if s["first_ts"] else None
        last = dt.datetime.fromtimestamp(s["last_ts"] / 1000, dt.UTC) if s["last_ts"] else None
        err.print(f"rows {s['rows']:,} | cards {s['cards']:,} | span {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC"
                  f" | {summary_line(s)} | {used} -> {out} (fraud kinds -> {kinds.name}) | "
                  f"{time.perf_counter() - t0:.1f}s")

    @app.command()
    def replay(
        input: Path = typer.Option(..., "--input", "-i", help="History file (Parquet or CSV) in the SPEC schema: from "
                                   "`velocity generate` or your own (README: Bring your own history)."),
        speed: str = typer.Option("max", help="max (as fast as possible), 1 (real time), 60 (60x), any positive factor."),
        limit: int = typer.Option(None, min=0, help="Send at most this many rows (0 or more)."),
        start_at: str = typer.Option("0", help="Row index, or an ISO time (the first row, in file order, at or after "
                                     "it), to start from."),
        topic: str = typer.Option(None, help="Topic [env VELOCITY_KAFKA_TOPIC_TRANSACTIONS, default transactions]."),
        bootstrap: str = typer.Option(None, help="Kafka brokers [env VELOCITY_KAFKA_BOOTSTRAP, default 127.0.0.1:9092]."),
        workers: int = typer.Option(2, help="Producer processes (each owns whole partitions, so per-card order holds)."),
        labels: bool = typer.Option(False, "--labels", help="Also send fraud labels to the labels topic, each once "
                                    "the replay's event-time clock passes its labeled_at. From the history's "
                                    "labeled_at column when it has one (null = never labeled); else every fraud "
                                    "row gets a drawn delay. Legitimate rows get no label: nobody confirms a "
                                    "legitimate payment, so an unlabeled transaction stays presumed legitimate."),
        labels_topic: str = typer.Option(None, help="Labels topic [env VELOCITY_KAFKA_TOPIC_LABELS, default labels]."),
        label_delay_median_days: float = typer.Option(5.0, help="Median label delay (days; log-normal, when the "
                                                      "history has no labeled_at column)."),
        label_delay_spread: float = typer.Option(0.8, help="Spread (sigma) of the log-normal delay: with the "
                                                 "defaults ~88% of labels come within 1-14 days."),
        label_delay_max_days: float = typer.Option(60.0, help="Longest label delay (days): the tail is cut here."),
        label_seed: int = typer.Option(42, help="Seed of the drawn label delays (same seed, same delays)."),
    ) -> None:
        """Replay a history into Kafka in file order (its stream order), paced by event time, keyed by entity key.

        Messages carry the card's entity key and last 4 digits, never the card number; message timestamp = event
        time. Rows the stream worker would reject (bad card numbers, amounts, times: older than 2000 or more than
        VELOCITY_MAX_FUTURE_MS ahead of now) are refused before anything is sent (exit 2). acks=all with
        idempotence; delivery errors are retried with backoff and reported (exit 1), never dropped silently.
        Ctrl-C flushes what was sent and prints where to resume with --start-at.
        """
        import numpy as np
        from kafka.errors import KafkaError
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from featurestore.config import get_settings
        from featurestore.entity import redact_pans, warn_if_default_secret
        from ingest.replay import ReplayError, check_rows, replay_table
        from stores.history import HistoryError, load_history

        settings = get_settings()
        warn_if_default_secret(settings.entity_secret, "replay")
        if speed == "max":
            factor = None
        else:
            try:
                factor = float(speed)
                assert factor > 0
            except (ValueError, AssertionError):
                raise typer.BadParameter("must be 'max' or a positive number", param_hint="--speed") from None
        try:
            table = load_history(input)  # unsorted is fine: the row order is the stream order
        except HistoryError as exc:
            err.print(f"[red]error:[/] {escape(redact_pans(str(exc)))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        if start_at.isdigit():
            first = int(start_at)
        else:
            try:
                when = dt.datetime.fromisoformat(start_at)
            except ValueError:
                raise typer.BadParameter("row index or ISO time", param_hint="--start-at") from None
            when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
            at_or_after = table.column("ts").to_numpy() >= int(when.timestamp() * 1000)
            first = int(np.argmax(at_or_after)) if at_or_after.any() else table.num_rows
        total = max(0, min(table.num_rows, first + limit if limit is not None else table.num_rows) - first)
        try:  # before anything is produced: rows the stream worker would dead-letter
            check_rows(table, first, first + total, max_future_ms=settings.max_future_ms)
        except ReplayError as exc:
            err.print(f"[red]error:[/] {escape(str(input))}: {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        topic_name = topic or settings.kafka.topic_transactions
        brokers = bootstrap or settings.kafka.bootstrap
        plan, labels_to = None, labels_topic or settings.kafka.topic_labels
        if labels:
            from ingest.labels import LabelDelay, LabelPlanError, plan_labels

            delay = LabelDelay(median_days=label_delay_median_days, spread=label_delay_spread,
                               max_days=label_delay_max_days, seed=label_seed)
            try:
                plan = plan_labels(table, delay, now_ms=int(__import__("time").time() * 1000),
                                   max_future_ms=settings.max_future_ms)
            except LabelPlanError as exc:
                err.print(f"[red]error:[/] {escape(str(input))}: {escape(str(exc))}", soft_wrap=True, highlight=False)
                raise typer.Exit(2) from None
            held = f", {plan.held_back:,} not yet due held back" if plan.held_back else ""
            err.print(f"labels: {len(plan):,} planned for the file{held} -> {labels_to}")
        _check_kafka_credentials(brokers)
        err.print(f"replaying {total:,} rows of {input} to {topic_name} @ {brokers} (speed {speed})")
        with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]:>9} msg/s"), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("replay", total=total, rate="")
            t0 = __import__("time").perf_counter()

            def progress(done: int) -> None:
                el = __import__("time").perf_counter() - t0
                bar.update(task, completed=done, rate=f"{done / el:,.0f}" if el > 0 else "")

            try:
                stats = replay_table(table, bootstrap=brokers, topic=topic_name, secret=settings.entity_secret,
                                     speed=factor, limit=total, start_at=first, partitions=settings.kafka.partitions,
                                     workers=workers, progress=progress, max_future_ms=settings.max_future_ms,
                                     check=False, labels=plan, labels_topic=labels_to)
            except KafkaError as exc:
                err.print(f"[red]error:[/] Kafka at {brokers} is not reachable ({type(exc).__name__}); "
                          "is it running? (`velocity services status`)")
                raise typer.Exit(1) from None

        err.print(f"sent {stats.sent:,} | failed {stats.failed:,} | {stats.elapsed_s:.1f}s | {stats.tps:,.0f} msg/s"
                  + (f" | labels {stats.labels_sent:,} sent, {stats.labels_failed:,} failed" if labels else ""))
        if stats.interrupted:
            err.print(f"[yellow]interrupted[/]: flushed; resume with --start-at {stats.last_index + 1}")
            raise typer.Exit(130)
        if stats.failed or stats.labels_failed:
            err.print(f"[red]{stats.failed + stats.labels_failed:,} message(s) not delivered[/]: {stats.first_error}")
            raise typer.Exit(1)
        if stats.broker_errors:
            err.print(f"[yellow]note[/]: Kafka was unreachable or erroring during the run ({stats.broker_errors:,} "
                      "connection errors); rows were held and retried, and every one was acknowledged")
