"""`velocity batch` and `velocity features training-set`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True)


def _date(value: str | None, flag: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected YYYY-MM-DD, got {value!r}", param_hint=flag) from None


def _common(engine: str, history: Path | None, offline_dir: Path | None, master: str):
    from featurestore.config import get_settings

    settings = get_settings()
    if engine not in ("spark", "duckdb"):
        raise typer.BadParameter("spark or duckdb", param_hint="--engine")
    return settings, (offline_dir or settings.offline_dir)


def register(app: typer.Typer, features_app: typer.Typer) -> None:
    @app.command()
    def batch(
        date: str = typer.Option(None, help="Run date D: snapshot with cut-off D 00:00 UTC over [D-7d, D)."),
        start: str = typer.Option(None, help="Backfill: first run date (with --end)."),
        end: str = typer.Option(None, help="Backfill: last run date, inclusive."),
        engine: str = typer.Option("spark", help="spark (PySpark, any --master) or duckdb (in-process)."),
        history: Path = typer.Option(None, help="History file (Parquet/CSV) instead of the stream's archive."),
        master: str = typer.Option("local[*]", help="Spark master URL."),
        offline_dir: Path = typer.Option(None, help="Offline store root [default $VELOCITY_DATA_DIR/offline]."),
        online: bool = typer.Option(True, help="Also materialize the snapshot to the Redis online store."),
    ) -> None:
        """Compute card_agg_1w snapshots: offline Parquet by cut-off (atomic replace) and Redis (atomic switch)."""
        from batch.jobs import dates_between, open_engine, run_snapshots
        from featurestore.offline import OfflineError
        from featurestore.online import OnlineStore

        settings, root = _common(engine, history, offline_dir, master)
        d, s, e = _date(date, "--date"), _date(start, "--start"), _date(end, "--end")
        if (d is None) == (s is None and e is None) or (d is None and (s is None or e is None)):
            raise typer.BadParameter("give --date D, or --start D1 --end D2")
        try:
            days = [d] if d else dates_between(s, e)
            with err.status(f"loading events ({engine})"):
                eng = open_engine(engine, offline_dir=root, history=history, secret=settings.entity_secret,
                                  master=master)
            store = OnlineStore(settings.redis) if online else None
            if store is not None:
                store.ping()
            from rich.progress import Progress

            with Progress(console=err) as bar:
                task = bar.add_task("snapshots", total=2 * len(days))
                written = run_snapshots(eng, days, offline_dir=root, online=store,
                                        progress=lambda label: bar.update(task, advance=1, description=label))
            eng.close()
        except OfflineError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except Exception as exc:
            if "Redis" in type(exc).__module__ or "redis" in type(exc).__module__:
                err.print(f"[red]error:[/] Redis unreachable ({exc}); rerun with --no-online to skip it")
                raise typer.Exit(1) from None
            raise
        for day, n in written:
            err.print(f"{day}: {n:,} cards -> offline{' + Redis' if online else ''}")

    @features_app.command("training-set")
    def training_set(
        start: str = typer.Option(..., help="First day (UTC) of transactions, inclusive."),
        end: str = typer.Option(..., help="Last day, exclusive."),
        out: Path = typer.Option(..., help="Output Parquet file."),
        engine: str = typer.Option("duckdb", help="duckdb (in-process) or spark."),
        history: Path = typer.Option(None, help="History file instead of the stream's archive."),
        master: str = typer.Option("local[*]", help="Spark master URL."),
        offline_dir: Path = typer.Option(None, help="Offline store root [default $VELOCITY_DATA_DIR/offline]."),
    ) -> None:
        """Point-in-time training set: 10-minute window as of each transaction, 1-week snapshot as-of joined."""
        from batch.jobs import build_training_set, open_engine
        from featurestore.offline import OfflineError

        settings, root = _common(engine, history, offline_dir, master)
        try:
            with err.status(f"building training set ({engine})"):
                eng = open_engine(engine, offline_dir=root, history=history, secret=settings.entity_secret,
                                  master=master)
                frame = build_training_set(eng, _date(start, "--start"), _date(end, "--end"), out)
                eng.close()
        except OfflineError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        if isinstance(frame, int):
            err.print(f"{frame:,} rows -> {out} (Parquet dataset written by Spark)")
            return
        missing = int(frame["snapshot_cutoff_ms"].isna().sum())
        err.print(f"{len(frame):,} rows, fraud {int(frame['fraud_label'].fillna(0).sum()):,}, "
                  f"{missing:,} without a 1-week snapshot -> {out}")
