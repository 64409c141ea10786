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

# Mistakes on the command line (unknown option, a value of the wrong type, a missing one) are
# click UsageErrors; typer vendors click in recent releases, so take the class it really raises.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

for _name in COMMANDS:
    importlib.import_module(f"orbit.commands.{_name}").register(app)


def main() -> None:
    """Console entry point: user errors (ours and the command line's) become one line on stderr
    and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        print(f"orbit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except _USAGE_ERROR as e:
        if not sys.argv[1:]:  # plain `orbit`: the overview, as --help shows it
            print(e.ctx.get_help() if e.ctx else "usage: orbit COMMAND --help")
            sys.exit(0)
        where = f"orbit {e.ctx.info_name} --help" if e.ctx and e.ctx.parent else "orbit --help"
        print(f"orbit: error: {e.format_message()} (see `{where}`)", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("orbit: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
