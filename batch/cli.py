"""`velocity batch` and `velocity features training-set`."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)
log = logging.getLogger(__name__)


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (no wrapping, no markup from the message), then exit with `code`."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Bad input in the offline store, a history file or an output path: a one-line message and exit 2.

    The DuckDB errors caught are the ones a damaged Parquet file raises while its rows are read (the footer
    check in stores.archive catches most damage before); the traceback is logged at DEBUG.
    """
    import duckdb

    from batch.quality import QualityError
    from stores.archive import ArchiveError
    from stores.history import HistoryError
    from stores.offline_files import OfflineError
    from stores.outputs import OutputError

    try:
        yield
    except (OfflineError, ArchiveError, HistoryError, OutputError, QualityError) as exc:
        fail(str(exc))
    except (duckdb.IOException, duckdb.InvalidInputException) as exc:
        log.debug("DuckDB could not read the input", exc_info=True)
        first = " ".join(str(exc).split("\n\n", 1)[0].split())
        fail(f"DuckDB could not read the offline input ({first}); if it names a damaged file, move that file "
              "aside (out of the offline store) and rerun")


def parse_date(value: str | None, flag: str) -> dt.date | None:
    """A YYYY-MM-DD flag value (None stays None); a bad one is a usage error naming the flag."""
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected YYYY-MM-DD, got {value!r}", param_hint=flag) from None


def _common(engine: str, offline_dir: Path | None):
    from featurestore.config import get_settings

    settings = get_settings()
    if engine not in ("spark", "duckdb"):
        raise typer.BadParameter("spark or duckdb", param_hint="--engine")
    return settings, (offline_dir or settings.offline_dir)


def _redis_error(exc: BaseException) -> bool:
    return "redis" in type(exc).__module__.lower()


@contextmanager
def _remove_partial_spark_output(out: Path) -> Iterator[None]:
    """Spark writes its dataset next to --out (`NAME.writing-*`) and swaps it in when complete; a run that
    fails midway removes the work folder it started, so nothing half-written is left."""
    pattern = f"{out.name}.writing-*"
    before = set(out.parent.glob(pattern)) if out.parent.is_dir() else set()
    try:
        yield
    except BaseException:
        if out.parent.is_dir():
            for partial in set(out.parent.glob(pattern)) - before:
                shutil.rmtree(partial, ignore_errors=True)
        raise


archive_app = typer.Typer(help="The offline archive of every streamed transaction: upkeep.", no_args_is_help=True)


@archive_app.command("maintain")
def archive_maintain(
    offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
    retention_days: int = typer.Option(None, min=1, help="Expire days older than this many days before today "
                                       "(default: keep everything)."),
    min_files: int = typer.Option(4, min=2, help="Compact a past day once it has at least this many files."),
    grace_minutes: float = typer.Option(60, min=0, help="Delete replaced files and expired days only this long "
                                        "after they were hidden: longer than any training-set build or backfill."),
) -> None:
    """Merge each past day's small files into one and expire old days, without breaking a reader in progress:
    replaced files and expired days are hidden first and deleted by a later run after the grace period."""
    from featurestore.config import get_settings
    from stores.archive_maintenance import maintain

    root = offline_dir or get_settings().offline_dir
    report = maintain(root, today=dt.datetime.now(dt.UTC).date(), retention_days=retention_days,
                      min_files=min_files, grace_s=grace_minutes * 60)
    for line in report.lines():
        err.print(line)


def register(app: typer.Typer, features_app: typer.Typer) -> None:
    register_status(features_app)
    app.add_typer(archive_app, name="archive")

    @app.command()
    def batch(
        date: str = typer.Option(None, help="Run date D: every batch group's snapshot with cut-off D 00:00 UTC "
                                 "(each over its window before D)."),
        start: str = typer.Option(None, help="Backfill: first run date (with --end)."),
        end: str = typer.Option(None, help="Backfill: last run date, inclusive."),
        engine: str = typer.Option("spark", help="spark (PySpark, any --master) or duckdb (in-process)."),
        history: Path = typer.Option(None, help="History file (Parquet/CSV) instead of the stream's archive."),
        master: str = typer.Option("local[*]", help="Spark master URL."),
        offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
        online: bool = typer.Option(True, help="Also materialize the snapshot to the Redis online store."),
        skip_quality_gate: bool = typer.Option(False, help="Publish even a night that fails the quality gate "
                                               "(impossible values, or cards/feature medians far from the night "
                                               "before)."),
        max_row_change: float = typer.Option(0.5, min=0, help="Quality gate: largest relative change in the "
                                             "number of cards against the night before."),
        max_median_factor: float = typer.Option(3.0, min=1, help="Quality gate: largest factor between a "
                                                "feature's median and the night before's."),
    ) -> None:
        """Compute every batch group's snapshots (card_agg_1w, and any other declared nightly group): offline
        Parquet per group and cut-off (atomic replace) and Redis (one atomic switch per night).

        Bad input (a damaged archive file, a bad --history file, an unwritable --offline-dir) stops the run
        before anything is written, with a one-line message and exit code 2; Redis unreachable exits 1.
        """
        from batch.engines import dates_between, open_engine, run_snapshots
        from batch.quality import QualityLimits
        from stores.outputs import check_output_dir
        from stores.redis_online import OnlineStore

        settings, root = _common(engine, offline_dir)
        d, s, e = parse_date(date, "--date"), parse_date(start, "--start"), parse_date(end, "--end")
        if (d is None) == (s is None and e is None) or (d is None and (s is None or e is None)):
            raise typer.BadParameter("give --date D, or --start D1 --end D2")
        store = None
        try:
            with _clear_errors():
                days = [d] if d else dates_between(s, e)
                check_output_dir(root, flag="--offline-dir")
                if online:  # before the (long) load: an unreachable Redis fails in seconds
                    store = OnlineStore(settings.redis)
                    store.ping()
                with err.status(f"loading events ({engine})"):
                    eng = open_engine(engine, offline_dir=root, history=history, secret=settings.entity_secret,
                                      master=master, allowed_lateness_ms=settings.allowed_lateness_ms)
                try:
                    from rich.progress import Progress

                    with Progress(console=err) as bar:
                        task = bar.add_task("snapshots", total=2 * len(days))
                        limits = None if skip_quality_gate else QualityLimits(max_row_change, max_median_factor)
                        written = run_snapshots(eng, days, offline_dir=root, online=store, quality=limits,
                                                progress=lambda label: bar.update(task, advance=1, description=label))
                finally:
                    eng.close()
        except Exception as exc:
            if _redis_error(exc):
                log.debug("Redis error", exc_info=True)
                fail(f"Redis at {settings.redis.host}:{settings.redis.port} is unreachable or failed "
                      f"({' '.join(str(exc).split())}); start it (`velocity services up`) or rerun with --no-online",
                      code=1)
            raise
        for day, n in written:
            err.print(f"{day}: {n:,} cards ({len(eng.registry.batch_groups)} batch group(s)) -> "
                      f"offline{' + Redis' if online else ''}")

    @features_app.command("training-set")
    def training_set(
        start: str = typer.Option(..., help="First day (UTC) of transactions, inclusive."),
        end: str = typer.Option(..., help="Last day, exclusive."),
        out: Path = typer.Option(..., help="Output Parquet file (with --engine spark: a Parquet dataset folder). "
                                 "Checked before any work: an existing folder or an unwritable path is refused."),
        engine: str = typer.Option("duckdb", help="duckdb (in-process) or spark."),
        history: Path = typer.Option(None, help="History file instead of the stream's archive."),
        master: str = typer.Option("local[*]", help="Spark master URL."),
        offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
    ) -> None:
        """Point-in-time training set: stream windows as of each transaction, each nightly group's snapshot
        as-of joined on its entity (card or merchant).

        Written atomically: a failed run leaves no partial file. Bad input exits 2 with a one-line message.
        """
        from batch.engines import build_training_set, open_engine
        from stores.outputs import check_output_file

        settings, root = _common(engine, offline_dir)
        first, last = parse_date(start, "--start"), parse_date(end, "--end")
        with _clear_errors():
            # Spark replaces a dataset folder it wrote before; any other folder is the user's and is refused.
            check_output_file(out, flag="--out", allow_dataset_dir=engine == "spark")
            with _remove_partial_spark_output(out), err.status(f"building training set ({engine})"):
                eng = open_engine(engine, offline_dir=root, history=history, secret=settings.entity_secret,
                                  master=master, allowed_lateness_ms=settings.allowed_lateness_ms)
                try:
                    frame = build_training_set(eng, first, last, out)
                finally:
                    eng.close()
        if isinstance(frame, int):
            kind = "Parquet dataset written by Spark" if engine == "spark" else "Parquet"
            err.print(f"{frame:,} rows -> {out} ({kind})")
            return
        missing = int(frame["snapshot_cutoff_ms"].isna().sum())
        err.print(f"{len(frame):,} rows, fraud {int(frame['fraud_label'].fillna(0).sum()):,}, "
                  f"{missing:,} without a nightly snapshot -> {out}")


def missed_nights(published: list[dt.date], today: dt.date, lookback_days: int) -> list[dt.date]:
    """Nights in (today - lookback, today] without a published snapshot."""
    have = set(published)
    return [d for d in (today - dt.timedelta(days=i) for i in range(lookback_days - 1, -1, -1)) if d not in have]


def register_status(features_app: typer.Typer) -> None:
    @features_app.command("snapshot-status")
    def snapshot_status(
        offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
        lookback_days: int = typer.Option(7, min=1, help="Nights (ending today, UTC) that must all be published."),
        today: str = typer.Option(None, help="Check as of this date (YYYY-MM-DD; default: today, UTC)."),
        metrics_file: Path = typer.Option(None, help="Also write Prometheus metrics to this file (for a node "
                                          "exporter's textfile collector), atomically."),
    ) -> None:
        """Say whether every recent night's snapshots were published (a night counts when every batch group has
        its file). Exit 1 when one is missing, so a scheduler or monitor can alert; the online store keeps serving
        the latest snapshot meanwhile."""
        from featurestore.config import get_settings
        from featurestore.definitions import REGISTRY
        from stores.offline_files import read_snapshots, snapshot_day

        root = offline_dir or get_settings().offline_dir
        day = parse_date(today, "--today") or dt.datetime.now(dt.UTC).date()
        per_group = [{snapshot_day(p) for p in read_snapshots(root, g.name)} for g in REGISTRY.batch_groups]
        published = sorted(set.intersection(*per_group))
        missed = missed_nights(published, day, lookback_days)
        latest = published[-1] if published else None
        if metrics_file is not None:
            import os

            lines = ["# HELP velocity_snapshot_missed_nights Nights in the lookback without a published snapshot.",
                     "# TYPE velocity_snapshot_missed_nights gauge", f"velocity_snapshot_missed_nights {len(missed)}",
                     "# HELP velocity_snapshot_latest_cutoff_seconds Cut-off of the newest published snapshot.",
                     "# TYPE velocity_snapshot_latest_cutoff_seconds gauge",
                     "velocity_snapshot_latest_cutoff_seconds "
                     f"{dt.datetime.combine(latest, dt.time(), dt.UTC).timestamp() if latest else 0:.0f}"]
            tmp = metrics_file.with_name(f".{metrics_file.name}.tmp")
            tmp.write_text("\n".join(lines) + "\n")
            os.replace(tmp, metrics_file)
        if latest is None:
            err.print(f"no snapshot published under {root}")
        else:
            err.print(f"latest snapshot: cut-off {latest} ({len(published)} nights under {root})")
        if missed:
            err.print(f"[red]missed {len(missed)} night(s)[/] in the last {lookback_days}: "
                      f"{', '.join(map(str, missed))}; run `velocity batch --start {missed[0]} --end {missed[-1]}`",
                      soft_wrap=True, highlight=False)
            raise typer.Exit(1)
        err.print(f"every night of the last {lookback_days} is published")
