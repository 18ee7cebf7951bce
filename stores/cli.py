"""`velocity features ...`: look at what the online store holds for a card."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stores.rotate_cli import HELP as ROTATE_HELP
from stores.rotate_cli import rotate_key

app = typer.Typer(help="Inspect features: the online store for a card, PAN -> entity key, training sets.",
                  no_args_is_help=True)
console = Console()


@app.command("key")
def key(pan: str = typer.Argument(..., help="A card number (PAN).")) -> None:
    """Print the entity key of a PAN (the keyed hash every store and Kafka key uses)."""
    from featurestore.config import get_settings
    from featurestore.entity import entity_key, mask_pan

    secret = get_settings().entity_secret
    console.print(f"{mask_pan(pan)} -> {entity_key(pan, secret)}")
    previous = getattr(secret, "previous", None)  # during a key rotation: the key it had before
    if previous is not None:
        console.print(f"{mask_pan(pan)} -> {entity_key(pan, secret, previous)} (version {previous}, before rotation)")


@app.command("get")
def get(
    card: str = typer.Argument(..., help="A PAN or an entity key."),
    at: int | None = typer.Option(None, help="Event time (epoch ms) to read the window as of; default now."),
    txn: str | None = typer.Option(None, help="A stored transaction's txn_id: its features exactly as its score saw "
                                   "them at arrival (its own time, only what arrived before it, plus itself)."),
    merchant: str | None = typer.Option(None, help="A merchant id as transactions carry it: also show that "
                                        "merchant's nightly groups (as a transaction of this card there would see)."),
) -> None:
    """Show a card's online features: every declared group, per group the snapshot serving it, and the card's
    window state.

    Without --txn, the window as of --at over everything that has arrived so far; with --txn, what that
    transaction was scored with. A read reaching back beyond what Redis still holds (events trimmed, the
    snapshot expired) is refused with exit 1 rather than answered from a truncated window: the offline store
    (`velocity features training-set`) has the answer. Merchant groups show NaN without --merchant.
    """
    import redis

    from featurestore import definitions
    from featurestore.config import get_settings
    from featurestore.entity import entity_key, mask_pan, redact_pans
    from stores.redis_online import OnlineStore, now_ms

    settings = get_settings()
    is_pan = card.isdigit() and 12 <= len(card) <= 19
    key = entity_key(card, settings.entity_secret) if is_pan else card
    if merchant is not None:
        merchant = redact_pans(merchant)  # stored as events carry it: PAN-like digit runs masked at the edge
    store = OnlineStore(settings.redis, registry=definitions.REGISTRY)
    ts = at if at is not None else now_ms()
    try:
        key = _resolve_key(store, settings, card, key, is_pan)
        state = store.card_state(key)  # last_seq, newest, oldest, trimmed (what the apply script keeps)
        stored = bool(txn) and bool(store.redis.hexists(store.keys.card(key), txn))
        feats = store.read_features(key, txn or "__inspect__", ts, None, merchant=merchant)  # no amount of its own
    except redis.RedisError as exc:
        Console(stderr=True).print(
            f"[red]error:[/] Redis at {settings.redis.host}:{settings.redis.port} is unreachable or failed "
            f"({escape(' '.join(str(exc).split()))}); start it (`velocity services up`) or set VELOCITY_REDIS_*",
            soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    if not state and not is_pan:
        console.print(f"[yellow]no online state for entity key {key}[/]")
    if merchant is not None and not any(g.entity == "merchant" for g in store.registry.batch_groups):
        console.print("[yellow]--merchant: the feature registry declares no merchant groups[/]")
    if not feats.complete:
        Console(stderr=True).print(
            f"[red]error:[/] ts={feats.ts} is older than what the online store still holds for this card (its window "
            "events or the 1-week snapshot were trimmed by retention); read it from the offline store instead "
            "(`velocity features training-set`)", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
    if txn is not None and not stored:
        console.print(f"[yellow]{escape(txn)} is not stored for this card: read as a new transaction at ts={ts}[/]")
    title = f"{escape(txn)} as scored" if stored else f"as of ts={feats.ts}"
    at_merchant = "" if merchant is None else f" at merchant {escape(merchant[:64])}"
    table = Table(title=f"card {mask_pan(card) if is_pan else key}{at_merchant} {title}")
    table.add_column("group")
    table.add_column("feature")
    table.add_column("value", justify="right")
    for group in store.registry.groups:
        for name in group.feature_names:
            table.add_row(group.name, name, str(feats.values[name]))
        if group.source == "batch":
            table.add_row(group.name, "snapshot_cutoff_ms", str(feats.group_cutoffs.get(group.name)))
    for k, v in state.items():
        table.add_row("card state", k, str(v))
    console.print(table)


def _resolve_key(store, settings, card: str, key: str, is_pan: bool) -> str:
    """A PAN's key during a rotation (the previous version's while the card has no state under the current one);
    a given key must be of a configured version (exit 2, one line, otherwise)."""
    from featurestore.entity import EntityKeyer, EntitySecrets, UnknownKeyVersion
    from stores.rekey_online import RotationResolver

    keyer = EntityKeyer(settings.entity_secret)
    if is_pan:
        return RotationResolver(store.keys, keyer).resolve_sync(store, [keyer(card)])[0]
    ring = settings.entity_secret
    try:
        (ring if isinstance(ring, EntitySecrets) else EntitySecrets({1: ring})).version_of(key)
    except UnknownKeyVersion as exc:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    return key


app.command("rotate-key", help=ROTATE_HELP)(rotate_key)
