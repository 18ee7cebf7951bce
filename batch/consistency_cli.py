"""`velocity consistency`: the online/offline skew report (batch/consistency.py), for people and schedulers."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def render(report, console: Console = out, explain_limit: int = 20) -> None:
    """The report: per-feature mismatch counts and rates and the largest differences, stream then API."""
    from rich import box
    from rich.table import Table

    from batch.consistency import REL_TOL

    since = "" if report.since_ms is None else f" since {_when(report.since_ms)}"
    console.print(f"{report.stream.sampled + report.api.sampled} score record(s) from topic {report.topic}{since} "
                  f"({report.stream.sampled} stream, {report.api.sampled} api); offline: archive"
                  f"{f' (+{report.spool_rows} spooled rows)' if report.spool_rows else ''} and snapshots under "
                  f"{report.offline_dir}, DuckDB engine; floats equal to {REL_TOL:g} relative",
                  soft_wrap=True, highlight=False)
    for side, title in ((report.stream, "stream scores (the reference: 0 mismatches expected)"),
                        (report.api, "API scores (served before the transaction entered the stream)")):
        console.print()
        console.print(f"[bold]{title}[/]: {side.compared} compared"
                      + (f", {len(side.missing)} not in the offline store" if side.missing else ""),
                      highlight=False)
        if not side.compared:
            _missing_lines(side, console)
            continue
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
        for col, justify in (("feature", "left"), ("mismatches", "right"), ("rate", "right"),
                             ("largest difference (txn: served vs offline)", "left")):
            table.add_column(col, justify=justify, no_wrap=True)
        largest = side.largest_by_feature()
        for name, n in side.per_feature().items():
            d = largest.get(name)
            where = "" if d is None else f"{d.txn_id}: {_fmt(d.online)} vs {_fmt(d.offline)}"
            table.add_row(name, str(n), f"{n / side.compared:.2%}", escape(where))
        console.print(table)
        rows = side.differing
        if side.source == "stream":
            verdict = ("[green]0 mismatches[/]: every feature the stream served equals its offline recomputation"
                       if not rows else f"[red]{side.mismatches} mismatching value(s) in {len(rows)} of "
                       f"{side.compared} transactions: online/offline skew[/]")
            console.print(verdict, highlight=False)
        else:
            explained = sum(1 for r in rows if r.explained)
            console.print(f"agreement {side.agreement:.1%} ({side.compared - len(rows)} of {side.compared} answers "
                          f"equal offline); {len(rows)} differ, {explained} explained", highlight=False)
        for r in rows[:explain_limit]:
            names = ", ".join(d.feature for d in r.diffs)
            console.print(f"  {escape(r.record.txn_id)} (card {r.record.card[:8]}…): {names} — "
                          f"{escape(r.explanation or '')}", soft_wrap=True, highlight=False)
        if len(rows) > explain_limit:
            console.print(f"  … and {len(rows) - explain_limit} more", highlight=False)
        _missing_lines(side, console)


def _missing_lines(side, console: Console) -> None:
    if not side.missing:
        return
    ids = ", ".join(r.txn_id for r in side.missing[:5])
    why = ("the worker archives every transaction it scores: look at the worker's --offline-dir "
           "(VELOCITY_DATA_DIR)" if side.source == "stream" else
           "answers with published: false never entered the stream" if any(r.published is False
                                                                          for r in side.missing)
           else "not (yet) in the stream's archive")
    console.print(f"  not in the offline store: {escape(ids)}{' …' if len(side.missing) > 5 else ''} ({why})",
                  soft_wrap=True, highlight=False)


def _when(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def register(app: typer.Typer) -> None:
    @app.command()
    def consistency(
        since: str = typer.Option("24h", help="Scores at or after this: a duration back from now (30m, 24h, 2d), "
                                  "an ISO time (UTC unless it says otherwise), or `all`."),
        sample: int = typer.Option(10_000, min=1, help="At most this many of the most recent scores per source."),
        topic: str = typer.Option(None, help="Scores topic (env VELOCITY_KAFKA_TOPIC_SCORES, default scores)."),
        bootstrap: str = typer.Option(None, help="Kafka brokers (env VELOCITY_KAFKA_BOOTSTRAP)."),
        offline_dir: Path = typer.Option(None, help="Offline store root: the stream's archive and the snapshots "
                                         "(default $VELOCITY_DATA_DIR/offline)."),
        explain_limit: int = typer.Option(20, min=0, help="Differing transactions listed per source."),
    ) -> None:
        """Measure online/offline skew: recompute scored transactions' features offline and compare.

        Samples the most recent answers on the `scores` topic, the stream scorer's (source: stream) and what the HTTP API served (source: api), recomputes each transaction's features from the archive (rows still in the worker's spool included) and the nightly snapshots with the batch engine's point-in-time code, and prints per-feature mismatch counts and rates and the largest differences. Stream scores are the reference and must match exactly; for the API it prints the agreement rate and explains each difference (transactions still in flight, a snapshot published in between).

        Exit status: 0 when every sampled stream score matches offline; 1 when any differs or is missing from the offline store; 2 when there is nothing to check or the check cannot run.
        """
        from batch.consistency import ConsistencyError, check, parse_since
        from featurestore.config import get_settings

        settings = get_settings()
        try:
            since_ms = parse_since(since)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--since") from None
        try:
            with err.status("reading scores and recomputing their features offline"):
                report = check(bootstrap=bootstrap or settings.kafka.bootstrap,
                               topic=topic or settings.kafka.topic_scores,
                               offline_dir=offline_dir or settings.offline_dir, secret=settings.entity_secret,
                               allowed_lateness_ms=settings.allowed_lateness_ms, sample=sample, since_ms=since_ms)
        except ConsistencyError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        render(report, explain_limit=explain_limit)
        raise typer.Exit(report.exit_code)
