"""`orbit evaluate` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate", help="Not implemented yet.")
    def _cmd() -> None:
        print("orbit evaluate: not implemented yet")
        raise typer.Exit(2)
