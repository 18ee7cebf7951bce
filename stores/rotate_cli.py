"""`velocity features rotate-key`: re-key the online and offline stores from one entity-key version to another.

Re-keying needs each card's old and new key, so it needs the card numbers, which Velocity stores nowhere (by
design). The operator gives them: the card list of the system of record (a file, one PAN per line) or a history
file (Parquet or CSV with a `cc_num` column). They are read into memory, turned into key pairs and never written
or printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

HELP = "\n\n".join([
    'Re-key the stores from entity-key version FROM to TO (both configured in VELOCITY_ENTITY_SECRETS).',
    "Velocity never stores card numbers, so the rotation's input is where they are: --pans names a file of the card numbers to move, one per line (the card list of your system of record), or a Parquet/CSV history with a cc_num column ('-' reads stdin). They stay in memory; nothing writes or prints them.",
    'Procedure: 1. set VELOCITY_ENTITY_SECRETS="2:<new>,1:<old>" on every process and restart them (new keys are version 2; a card without version-2 state is read, and written, under its version-1 key); 2. run this command (--dry-run first); 3. run it again until it moves nothing (transactions still in flight under the old key); 4. drop version 1 from the configuration. The online store is re-keyed card by card (copy then delete, merged with what the new key already holds), then the offline store file by file (atomic rewrites); a rerun redoes only what is left, so an interrupted run is simply run again.',
])


def read_pans(source: str) -> tuple[list[str], int]:
    """The distinct card numbers in `source` (text, Parquet or CSV), and how many entries were not card numbers."""
    if source != "-" and Path(source).suffix.lower() in (".parquet", ".csv"):
        values = _column(Path(source))
    else:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        values = [line.strip() for line in text.splitlines()]
        values = [v for v in values if v and not v.startswith("#")]
    pans = dict.fromkeys(v for v in values if isinstance(v, str) and v.isdigit() and v.isascii() and 12 <= len(v) <= 19)
    return list(pans), len(values) - sum(1 for v in values if v in pans)


def _column(path: Path) -> list:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".csv":
        opts = pacsv.ConvertOptions(column_types={"cc_num": pa.string()}, include_columns=["cc_num"])
        table = pacsv.read_csv(path, convert_options=opts)
    else:
        table = pq.read_table(path, columns=["cc_num"])
    return table.column("cc_num").cast(pa.string()).unique().to_pylist()


def rotate_key(
    from_version: int = typer.Option(..., "--from", help="The version whose keys are moved (e.g. 1)."),
    to_version: int = typer.Option(..., "--to", help="The version they move to (e.g. 2, the current one)."),
    pans: str = typer.Option(..., "--pans", help="File of card numbers, one per line, or a Parquet/CSV history "
                             "with cc_num; '-' for stdin. Never written or printed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would move; change nothing."),
    online: bool = typer.Option(True, "--online/--no-online", help="Re-key the Redis online store."),
    offline: bool = typer.Option(True, "--offline/--no-offline", help="Re-key the offline store's files."),
    offline_dir: Path | None = typer.Option(None, help="Offline store (default $VELOCITY_DATA_DIR/offline)."),
) -> None:
    import redis

    from featurestore.config import get_settings
    from featurestore.entity import EntitySecrets, UnknownKeyVersion
    from stores.redis_online import OnlineStore

    settings = get_settings()
    ring = settings.entity_secret
    if not isinstance(ring, EntitySecrets):
        ring = EntitySecrets({1: ring})
    if from_version == to_version:
        _fail("--from and --to are the same version: nothing to rotate")
    try:
        ring.version_of(ring.key("0", from_version))
        ring.version_of(ring.key("0", to_version))
    except UnknownKeyVersion as exc:
        _fail(str(exc))
    try:
        cards, skipped = read_pans(pans)
    except (OSError, ValueError) as exc:
        _fail(f"cannot read --pans {pans}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}")
    if skipped:
        err.print(f"[yellow]warning:[/] {skipped} entries of --pans are not card numbers (12-19 digits): skipped")
    mapping = {ring.key(p, from_version): ring.key(p, to_version) for p in cards}
    del cards
    what = "would move" if dry_run else "moved"
    out.print(f"rotate-key v{from_version} -> v{to_version}: {len(mapping)} cards{' (dry run)' if dry_run else ''}")
    if online:
        from stores.rekey_online import rekey_online

        store = OnlineStore(settings.redis)
        try:
            stats = rekey_online(store, list(mapping.items()), dry_run=dry_run,
                                 on_progress=lambda n: out.print(f"  online: {n}/{len(mapping)} cards"))
        except redis.RedisError as exc:
            _fail(f"Redis at {settings.redis.host}:{settings.redis.port} failed ({' '.join(str(exc).split())}); "
                  "nothing is lost: rerun rotate-key once it is reachable")
        finally:
            store.close()
        out.print(f"online: {what} {stats.cards_moved} cards ({stats.events_copied} window events), "
                  f"{stats.snapshot_hashes_moved} snapshot hashes")
    if offline:
        from stores.rekey_offline import rekey_offline

        root = offline_dir or settings.offline_dir
        ostats = rekey_offline(root, mapping, dry_run=dry_run,
                               on_progress=lambda n, total: n % 100 == 0 and out.print(f"  offline: {n}/{total} files"))
        out.print(f"offline: {what} {ostats.rows_rekeyed} rows in {ostats.files_rewritten} of {ostats.files} files")


def _fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)
