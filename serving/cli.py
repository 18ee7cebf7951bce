"""`velocity serve`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from serving.cli_serve import serve

    app.command()(serve)
