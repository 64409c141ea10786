"""`orbit landscape`: the paper's four experiments on conserved quantities and flat minima."""

from __future__ import annotations

from pathlib import Path

import typer

from orbit.errors import UserError

DEFAULT_OUT = Path("runs") / "landscape"
CHOICES = ("dynamics", "distribution", "convergence", "sharpness")
MAX_WIDTH = 4096


def _widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise UserError(f"--widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) <= 0:
        raise UserError(f"--widths must be positive integers, got {text!r}")
    if max(widths) > MAX_WIDTH:
        raise UserError(
            f"--widths {max(widths)} is beyond {MAX_WIDTH}: these are small two-layer problems"
            " (memory grows with the square of the width)"
        )
    return widths


def _positive(**values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def register(app: typer.Typer) -> None:
    @app.command("landscape")
    def landscape_cmd(
        experiment: str = typer.Argument(
            ..., help="dynamics | distribution | convergence | sharpness"
        ),
        out: Path = typer.Option(DEFAULT_OUT, help="Directory for EXPERIMENT.json and .png."),
        seed: int = typer.Option(0, help="Seed for data and initialisations."),
        steps: int = typer.Option(None, help="Gradient-descent steps (not for distribution)."),
        lr: float = typer.Option(None, help="Gradient-descent step size (not for distribution)."),
        draws: int = typer.Option(None, help="distribution: initialisations per width."),
        widths: str = typer.Option(None, help="distribution: comma-separated widths."),
    ) -> None:
        """Q over GD vs Adam steps (dynamics), Q under Xavier init (distribution), loss against
        initial Q (convergence), top Hessian eigenvalue against initial Q (sharpness)."""
        if experiment not in CHOICES:
            choices = ", ".join(CHOICES)
            raise UserError(f"unknown experiment {experiment!r}; choose one of: {choices}")
        _positive(steps=steps, lr=lr, draws=draws)
        if not 0 <= seed < 2**32:
            raise UserError(f"--seed must be in 0..2**32-1, got {seed}")
        from training.landscape import make_config, run_experiment

        config = make_config(
            experiment, seed=seed, steps=steps, lr=lr, draws=draws, widths=_widths(widths)
        )
        json_path, png_path, result = run_experiment(experiment, out, config)
        _print_summary(result)
        print(f"wrote {json_path} and {png_path} in {result['seconds']:.1f} s")


def _print_summary(result: dict) -> None:
    """The summary's numbers, one line each (nested dicts flattened)."""

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is None:
            print(f"{prefix}: null")
        elif isinstance(value, float):
            print(f"{prefix}: {value:.4g}")
        else:
            print(f"{prefix}: {value}")

    walk("", result["summary"])
