"""`orbit landscape` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("landscape", help="Not implemented yet.")
    def _cmd() -> None:
        print("orbit landscape: not implemented yet")
        raise typer.Exit(2)
