"""The `orbit` command line. Commands live in orbit/commands/ and import the heavy stages lazily,
so `orbit --help` and `orbit serve` never load torch."""

from __future__ import annotations

import importlib
import sys

import typer

from orbit.errors import UserError

COMMANDS = ("train", "build", "evaluate", "export", "serve", "run", "landscape")

app = typer.Typer(
    name="orbit",
    help="Cheap ensembles from the symmetries of one trained classifier: train, build, evaluate,"
    " export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMANDS:
    importlib.import_module(f"orbit.commands.{_name}").register(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as e:
        print(f"orbit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("orbit: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
