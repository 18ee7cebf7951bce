"""`velocity serve`, and the `demo` and `consistency` commands that arrive with the end-to-end issue."""

from __future__ import annotations

import typer

_LATER = "arrives with the end-to-end work (issue 15); not built yet"


def register(app: typer.Typer) -> None:
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
