"""`velocity generate` and `velocity replay` (filled by the ingest issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def generate() -> None:
        """Generate a Faker card-transaction history (not built yet: arrives with the ingest issue)."""
        typer.echo("velocity generate is not built yet", err=True)
        raise typer.Exit(2)

    @app.command()
    def replay() -> None:
        """Replay a history file into Kafka (not built yet: arrives with the ingest issue)."""
        typer.echo("velocity replay is not built yet", err=True)
        raise typer.Exit(2)
