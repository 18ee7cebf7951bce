"""`velocity features ...`: look at what the online store holds for a card."""

from __future__ import annotations

import math

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Inspect features: the online store for a card, PAN -> entity key, training sets.",
                  no_args_is_help=True)
console = Console()


@app.command("key")
def key(pan: str = typer.Argument(..., help="A card number (PAN).")) -> None:
    """Print the entity key of a PAN (the keyed hash every store and Kafka key uses)."""
    from featurestore.config import get_settings
    from featurestore.entity import entity_key, mask_pan

    console.print(f"{mask_pan(pan)} -> {entity_key(pan, get_settings().entity_secret)}")


@app.command("get")
def get(
    card: str = typer.Argument(..., help="A PAN or an entity key."),
    at: int | None = typer.Option(None, help="Event time (epoch ms) to read the window as of; default now."),
) -> None:
    """Show a card's current online features: both groups and the card's window state."""
    from featurestore.config import get_settings
    from featurestore.entity import entity_key, mask_pan
    from featurestore.online import OnlineStore, now_ms

    settings = get_settings()
    is_pan = card.isdigit() and 12 <= len(card) <= 19
    key = entity_key(card, settings.entity_secret) if is_pan else card
    store = OnlineStore(settings.redis)
    ts = at if at is not None else now_ms()
    state = store.card_state(key)
    if not state and not is_pan:
        console.print(f"[yellow]no online state for entity key {key}[/]")
    feats = store.read_features(key, "__inspect__", ts, 0)
    table = Table(title=f"card {mask_pan(card) if is_pan else key} as of ts={ts}")
    table.add_column("feature")
    table.add_column("value", justify="right")
    # The probe transaction (0 cents) is folded in like any read; take it back out for display.
    n10 = feats.num_trans_last_10m - 1
    avg10 = feats.sum_cents_last_10m / (100 * n10) if n10 else math.nan
    for name, value in [
        ("num_trans_last_10m", n10),
        ("avg_amt_last_10m", avg10),
        ("num_trans_last_1w", feats.num_trans_last_1w),
        ("avg_amt_last_1w", feats.avg_amt_last_1w),
        ("snapshot_cutoff_ms", feats.snapshot_cutoff_ms),
    ] + [(f"state.{k}", v) for k, v in sorted(state.items())]:
        table.add_row(name, str(value))
    console.print(table)
