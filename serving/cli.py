"""`velocity train|models|serve|demo|consistency`: arrive with the model and serving issues."""

from __future__ import annotations

import typer

_LATER = "arrives with the model and serving work; not built yet"


def register(app: typer.Typer) -> None:
    @app.command()
    def train() -> None:
        """Train the XGBoost fraud model from the offline training set (not built yet)."""
        typer.echo(f"velocity train {_LATER}", err=True)
        raise typer.Exit(2)

    models = typer.Typer(help="List and select trained models (not built yet).", no_args_is_help=True)

    @models.command("list")
    def list_models() -> None:
        """List model versions (not built yet)."""
        typer.echo(f"velocity models list {_LATER}", err=True)
        raise typer.Exit(2)

    app.add_typer(models, name="models")

    from serving.cli_serve import serve

    app.command()(serve)

    @app.command()
    def demo() -> None:
        """Reproduce the seed's fraud-attack story end to end (not built yet)."""
        typer.echo(f"velocity demo {_LATER}", err=True)
        raise typer.Exit(2)

    @app.command()
    def consistency() -> None:
        """Check online features against the offline training set (not built yet)."""
        typer.echo(f"velocity consistency {_LATER}", err=True)
        raise typer.Exit(2)
