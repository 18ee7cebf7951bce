"""`velocity batch` and `velocity features training-set` (filled by the batch issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, features_app: typer.Typer) -> None:
    @app.command()
    def batch() -> None:
        """Run the nightly 1-week batch job (not built yet: arrives with the batch issue)."""
        typer.echo("velocity batch is not built yet", err=True)
        raise typer.Exit(2)
