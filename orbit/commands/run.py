"""`orbit run`: chain train -> build -> evaluate -> export on one run directory.

Each step is the same command a user can run alone (invoked in-process with the same flags), so
`orbit run` adds no behaviour of its own: it only decides the order. Training and building are
skipped when their output already exists (unless --overwrite); evaluate and export always run,
since they are cheap next to training and take this call's flags (attacks, eps, ...).
"""

from __future__ import annotations

from pathlib import Path

import typer

from orbit.errors import UserError
from orbit.layout import RunLayout


def _invoke(args: list[str]) -> None:
    """Run one orbit subcommand in this process; a non-zero exit stops the chain."""
    from typer.main import get_command

    from orbit.cli import app

    print(f"\n$ orbit {' '.join(args)}", flush=True)
    code = get_command(app).main(args=args, prog_name="orbit", standalone_mode=False)
    if isinstance(code, int) and code != 0:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        run: Path = typer.Option(Path("runs/demo"), help="Run directory."),
        dataset: str = typer.Option("digits", help="Dataset of the base model."),
        model: str = typer.Option("cnn", help="Architecture of the base model."),
        epochs: int = typer.Option(None, help="Training epochs (default: per dataset)."),
        methods: str = typer.Option("symmetry,random", help="Ensembles to build (and deep)."),
        members: int = typer.Option(None, help="Ensemble size N (default: the build default)."),
        adv_train: bool = typer.Option(False, help="Also train the PGD adversarial baseline."),
        attacks: str = typer.Option("fgsm,pgd", help="Attacks to evaluate."),
        eps: str = typer.Option("0,0.05,0.1,0.2", help="L-inf budgets to evaluate."),
        threat: str = typer.Option("transfer,white-box", help="Threat models to evaluate."),
        samples: int = typer.Option(None, help="Test inputs to attack (default: up to 1000)."),
        seed: int = typer.Option(0, help="Seed of every step."),
        data_root: Path = typer.Option(None, help="Folder with the dataset files."),
        overwrite: bool = typer.Option(False, help="Redo steps whose output already exists."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Train a base model, build its ensembles, evaluate them under attack and export the
        symmetry ensemble as one ONNX graph, all into RUN."""
        from attacks.catalog import parse_attacks
        from attacks.threats import parse_eps, parse_threats, plan

        # The evaluation's flags are checked now, not after training and building.
        plan(parse_attacks(attacks), parse_threats(threat))
        parse_eps(eps)
        if samples is not None and samples <= 0:
            raise UserError(f"--samples must be positive, got {samples}")
        layout = RunLayout.of(run)
        common = ["--seed", str(seed)] + ([] if progress else ["--no-progress"])
        root = ["--data-root", str(data_root)] if data_root else []
        redo = ["--overwrite"] if overwrite else []

        def needed(marker: Path, step: str) -> bool:
            if marker.exists() and not overwrite:
                print(f"{step}: {marker} exists, skipped (--overwrite redoes it)")
                return False
            return True

        train = ["train", "--run", str(run), "--dataset", dataset, "--model", model, *root]
        train += ["--epochs", str(epochs)] if epochs is not None else []
        if needed(layout.base / "model.json", "train"):
            _invoke([*train, *common, *redo])
        if adv_train and needed(layout.adv / "model.json", "train --adv-train"):
            _invoke([*train, "--adv-train", "pgd", *common, *redo])
        for method in [m.strip() for m in methods.split(",") if m.strip()]:
            if needed(layout.ensemble(method) / "ensemble.json", f"build {method}"):
                size = ["--members", str(members)] if members is not None else []
                _invoke(["build", "--run", str(run), "--method", method, *size, *common, *redo])
        evaluate = ["evaluate", "--run", str(run), "--attacks", attacks, "--eps", eps]
        evaluate += [
            "--threat",
            threat,
            *(["--samples", str(samples)] if samples is not None else []),
        ]
        _invoke([*evaluate, *common])
        _invoke(["export", "--run", str(run)])
        print(f"\norbit run: done; everything is in {run}")
