"""`orbit build`: build an ensemble of a run's base model (symmetry, random or deep)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from orbit.errors import UserError
from orbit.layout import ENSEMBLE_METHODS, RunLayout


def _match_symmetry(layout: RunLayout, given: dict) -> dict:
    """The random baseline is matched, member by member, to the parameter distances of the
    symmetry ensemble built with the same settings: take those of the run's symmetry ensemble
    for every flag not given, and refuse a flag that contradicts it (the baseline would then
    be matched to members nobody evaluates)."""
    import json

    from ensemble.build import MATCHED_SETTINGS

    path = layout.ensemble("symmetry") / "ensemble.json"
    if not path.is_file():
        return given
    built = json.loads(path.read_text())
    out = dict(given)
    for key in MATCHED_SETTINGS:
        have = built.get(key)
        if given[key] is None:
            out[key] = have
        elif have is not None and given[key] != have:
            raise UserError(
                f"--{key} {given[key]} differs from the symmetry ensemble in {path.parent}"
                f" ({key} {have}), which the random baseline is matched to; leave --{key} out,"
                " or rebuild the symmetry ensemble with it first"
            )
    return out


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build_cmd(
        run: Path = typer.Option(..., help="Run directory holding base/ (e.g. runs/digits-cnn)."),
        method: str = typer.Option("symmetry", help=" | ".join(ENSEMBLE_METHODS)),
        members: int = typer.Option(
            None, help="Ensemble size N (default: 64; 5 for --method deep)."
        ),
        eps: float = typer.Option(
            None, help="Group step: g = expm(eps T) (default: 0.5, see ensemble/build.py)."
        ),
        anchors: int = typer.Option(None, help="Anchors k per member (default: hidden // 2)."),
        algebra: str = typer.Option(None, help="Lie algebra of T: gl | so | diag (default gl)."),
        seed: int = typer.Option(
            None, help="Seed of group elements, anchors and perturbations (default 0)."
        ),
        data_root: Path = typer.Option(
            None, help="Folder with the dataset files (default: the base model's)."
        ),
        overwrite: bool = typer.Option(False, help="Replace an ensemble already built."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Build an ensemble of RUN/base into RUN/ensemble/METHOD/ (ensemble.safetensors,
        ensemble.json, fidelity.json) and print its fidelity summary."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from ensemble.build import BuildRequest, build_ensemble, total_steps
        from orbit.atomic import atomic_dir
        from training.artifacts import load_model
        from training.datasets import load_dataset

        layout = RunLayout.of(run)
        given = dict(members=members, eps=eps, anchors=anchors, algebra=algebra, seed=seed)
        if method == "random":
            given = _match_symmetry(layout, given)
        given["algebra"] = given["algebra"] or "gl"
        given["seed"] = 0 if given["seed"] is None else given["seed"]
        request = BuildRequest(method=method, **given)
        target = layout.ensemble(method)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise UserError(f"{target} already holds an ensemble; pass --overwrite to replace it")
        base = load_model(layout.base)
        root = data_root or (base.info.get("train_config") or {}).get("data_root")
        splits = load_dataset(base.info.get("dataset", "digits"), root)

        err = Console(stderr=True)
        out = Console()
        bar = Progress(
            TextColumn("[bold]build {task.fields[method]}[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err,
            disable=not progress or not sys.stderr.isatty(),
            transient=True,
        )
        with bar, atomic_dir(target) as tmp:
            first = "training member 1" if method == "deep" else "solving"
            task = bar.add_task(first, total=total_steps(request), method=method)
            members_dir = tmp / layout.deep_members.relative_to(layout.ensemble("deep"))
            outcome = build_ensemble(
                base,
                splits,
                request,
                tmp,
                members_dir=members_dir if method == "deep" else None,
                progress=lambda nxt: bar.update(task, advance=1, description=nxt),
            )
        for note in outcome.warnings:
            err.print(f"[yellow]warning:[/] {note}", highlight=False)
        table = Table(title=f"fidelity of {target}", show_header=False)
        from ensemble.fidelity import summary_rows

        for label, value in summary_rows(outcome.fidelity):
            table.add_row(label, value)
        out.print(table)
        out.print(
            f"built {request.members} {method} members in {outcome.build_seconds:.2f} s"
            f" (fidelity {outcome.fidelity_seconds:.1f} s) -> {target}",
            highlight=False,
        )
