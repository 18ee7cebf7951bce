"""`velocity stream` (filled by the streaming issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def stream() -> None:
        """Run the faust stream worker (not built yet: arrives with the streaming issue)."""
        typer.echo("velocity stream is not built yet", err=True)
        raise typer.Exit(2)
