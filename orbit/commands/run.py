"""`orbit run`: chain train -> build -> evaluate -> export on one run directory."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("run", help="Placeholder: filled in below.")
    def _cmd() -> None:
        raise typer.Exit(2)
