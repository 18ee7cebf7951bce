"""`velocity features rebuild`: restore the online store from the offline store after Redis came back empty."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def register(features_app: typer.Typer) -> None:
    @features_app.command("rebuild")
    def rebuild_cmd(
        offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
        key_prefix: str = typer.Option(None, help="Redis key prefix (env VELOCITY_REDIS_KEY_PREFIX, default vel:v1)."),
        retention_ms: int = typer.Option(None, help="Event retention the stream workers run with (env "
                                         "VELOCITY_EVENT_RETENTION_MS, default 1 day): how far back to restore."),
        snapshots: bool = typer.Option(True, help="Also restore the latest snapshot(s) from the offline store."),
    ) -> None:
        """Restore what an emptied Redis lost: every card's window events, its arrival sequence and its txn_id
        records from the archive (Parquet plus workers' unrolled spools), and the latest snapshot(s).

        The archive is the source of truth (Kafka's retention may have dropped what the windows need). Safe to
        rerun, and it merges with what running workers wrote meanwhile; for exact windows, stop the stream
        workers, rebuild, then start them again. Exit 1 when Redis is unreachable, 2 on a damaged archive or
        snapshot file.
        """
        import redis
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from batch.rebuild import rebuild
        from featurestore.config import get_settings
        from stores.archive import ArchiveError
        from stores.offline_files import OfflineError
        from stores.redis_online import OnlineStore

        settings = get_settings()
        root = offline_dir or settings.offline_dir
        where = f"{settings.redis.host}:{settings.redis.port}"
        store = OnlineStore(settings.redis, prefix=key_prefix)
        try:
            store.ping()
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=err, transient=True) as bar:
                task = bar.add_task("reading the archive", total=None)
                report = rebuild(store, root, retention_ms=retention_ms or settings.event_retention_ms,
                                 snapshots=snapshots,
                                 on_total=lambda n: bar.update(task, total=n),
                                 on_progress=lambda n: bar.advance(task, n),
                                 on_stage=lambda s: bar.update(task, description=s))
        except (ArchiveError, OfflineError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except redis.RedisError as exc:
            err.print(f"[red]error:[/] Redis at {where} is unreachable or failed ({escape(' '.join(str(exc).split()))}"
                      "); start it (`velocity services up`) or set VELOCITY_REDIS_*, then rerun (a rebuild is safe "
                      "to repeat)", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
        finally:
            store.close()
        err.print(f"{report.summary()} (Redis {where}, prefix {store.keys.prefix})", soft_wrap=True,
                  highlight=False)
