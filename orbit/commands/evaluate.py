"""`orbit evaluate`: attack a run's base model, its ensembles and its adversarially trained
baseline side by side, and write RUN/report/ (report.json, report.md, figures)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from orbit.errors import UserError
from orbit.layout import RunLayout

DEFAULT_SAMPLES = 1000


def load_models(layout: RunLayout, wanted: list[str] | None) -> tuple[list, Any]:
    """The run's models as EvalModels (base first), and the base's LoadedModel."""
    from attacks.evaluate import EvalModel
    from ensemble.artifacts import load_ensemble
    from ensemble.build import MATCHED_SETTINGS
    from training.artifacts import load_model

    if not (layout.base / "model.json").is_file():
        raise UserError(f"{layout.root} has no base model ({layout.base}); run `orbit train` first")
    base = load_model(layout.base)
    meta = {"path": str(layout.base), "sha256": base.weights_sha256}
    models = [EvalModel("base", base.model, meta)]
    if (layout.adv / "model.json").is_file():
        adv = load_model(layout.adv)
        if adv.model.spec.input_shape != base.model.spec.input_shape:
            raise UserError(f"{layout.adv} was trained on other inputs than {layout.base}")
        meta = {"path": str(layout.adv), "sha256": adv.weights_sha256}
        meta["adversarial_training"] = adv.info.get("adversarial_training")
        models.append(EvalModel("adv", adv.model, meta))
    for method, path in layout.built_ensembles().items():
        loaded = load_ensemble(path, base)
        meta = {"path": str(path), "method": method, "members": loaded.ensemble.num_members}
        meta["sha256"] = loaded.info.get("tensors_sha256")
        for key in (*MATCHED_SETTINGS, "matched_to"):
            if loaded.info.get(key) is not None:
                meta[key] = loaded.info[key]
        models.append(EvalModel(method, loaded.ensemble, meta))
    if wanted is not None:
        unknown = [w for w in wanted if w not in {m.name for m in models}]
        if unknown:
            have = ", ".join(m.name for m in models)
            raise UserError(f"--models: {unknown[0]!r} is not in {layout.root} (it has: {have})")
        if "base" not in wanted:
            raise UserError("--models must include base (the transfer source)")
        models = [m for m in models if m.name in wanted]
    elif not any(m.is_ensemble for m in models):
        raise UserError(
            f"{layout.root} has no ensemble; build one (`orbit build --run {layout.root}`) or"
            " pass --models base to evaluate the base model alone"
        )
    return models, base


def _check_writable(folder: Path) -> None:
    """The report can be written into `folder` (created later, only once there are numbers)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"cannot write the report into {folder}: {existing} is not a directory;"
            " choose another --out"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the report into {folder}: {existing} is not writable")


def _reference_clean(base_dir: Path, n: int) -> dict[str, tuple[int, int]]:
    """Training's own test accuracy, when it was measured on exactly the evaluated inputs."""
    path = base_dir / "metrics.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if int(m["test_samples"]) == n:
            return {"base": (round(float(m["test_accuracy"]) * n), n)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}


def evaluate_run(
    run: Path,
    attacks: str = "fgsm,pgd",
    eps: str = "0,0.05,0.1,0.2",
    eps_l2: str = "0,0.5,1,2",
    threat: str = "transfer,white-box",
    samples: int | None = None,
    seed: int = 0,
    models: str | None = None,
    batch_size: int = 256,
    max_memory_mb: float = 4096.0,
    steps: int | None = None,
    step_size: float = 0.25,
    restarts: int = 1,
    queries: int = 5000,
    cw_c: float = 1.0,
    cw_kappa: float = 0.0,
    cw_lr: float = 0.01,
    data_root: Path | None = None,
    out: Path | None = None,
    accelerator: str = "cpu",
    devices: int = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    progress: bool = True,
):  # noqa: ANN201 - returns attacks.report.Report | None (imported lazily)
    """Validate everything, then evaluate the run; `orbit run` calls this too.

    Returns the report in the process the user started, None in other DDP processes.
    """
    from attacks.catalog import AttackOptions, parse_attacks
    from attacks.config import EvalConfig
    from attacks.threats import parse_eps, parse_threats, plan

    config = EvalConfig(
        attacks=tuple(parse_attacks(attacks)),
        threats=tuple(parse_threats(threat)),
        eps=tuple(parse_eps(eps)),
        eps_l2=tuple(parse_eps(eps_l2, "--eps-l2")),
        seed=seed,
        batch_size=batch_size,
        max_memory_mb=max_memory_mb,
        options=AttackOptions(
            steps=steps,
            step_size=step_size,
            restarts=restarts,
            queries=queries,
            cw_c=cw_c,
            cw_kappa=cw_kappa,
            cw_lr=cw_lr,
        ),  # fmt: skip
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        progress=progress,
    )
    plan(list(config.attacks), list(config.threats))  # every requested attack gets a cell
    if samples is not None and samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    layout = RunLayout.of(run)
    if not layout.root.is_dir():
        raise UserError(f"{layout.root} is not a run directory; run `orbit train` first")
    report_dir = out or layout.report
    _check_writable(report_dir)
    wanted = [m.strip() for m in models.split(",") if m.strip()] if models else None
    loaded, base = load_models(layout, wanted)

    from attacks.pipeline import evaluate
    from training.datasets import load_dataset

    dataset = base.info.get("dataset")
    if not dataset:
        raise UserError(f"{layout.base / 'model.json'} does not name its dataset; retrain it")
    root = data_root or (base.info.get("train_config") or {}).get("data_root")
    splits = load_dataset(dataset, root)
    if base.info.get("data_fingerprint") not in (None, splits.fingerprint()):
        raise UserError(
            f"the {dataset} files found differ from those {layout.base} was trained on;"
            " point --data-root at the original files"
        )
    test = splits.test
    if samples is not None and samples > len(test):
        raise UserError(
            f"--samples {samples} is more than the {len(test)} inputs of the {dataset} test split"
        )
    n = samples if samples is not None else min(DEFAULT_SAMPLES, len(test))
    data_info = {
        "dataset": dataset,
        "fingerprint": splits.fingerprint(),
        "test_size": len(test),
        "samples": n,
        "selection": f"the first {n} inputs of the test split",
        "num_classes": splits.num_classes,
        "class_names": splits.class_names,
    }
    return evaluate(
        loaded,
        test.x[:n].contiguous(),
        test.y[:n].contiguous(),
        splits.num_classes,
        config,
        report_dir,
        data_info,
        reference_clean=_reference_clean(layout.base, n),
    )


def print_summary(report: Any, out_dir: Path) -> None:
    """The headline numbers and every sanity warning, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="robust accuracy % [Wilson 95%]")
    for col in ("model", "attack", "threat", "eps", "accuracy", "n"):
        table.add_column(col)
    for r in report.rows:
        if r["role"] == "sweep" and r.get("from_clean"):
            continue
        lo, hi = r["ci95"]
        table.add_row(
            r["model"],
            r["attack"] or "clean",
            r["threat"],
            f"{r['eps']:g}",
            f"{100 * r['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
            str(r["n"]),
        )
    console.print(table)
    passed = sum(c["status"] == "passed" for c in report.sanity)
    skipped = sum(c["status"] == "skipped" for c in report.sanity)
    warns = report.warnings()
    console.print(
        f"sanity checks: {passed} passed, {len(warns)} warnings, {skipped} skipped",
        highlight=False,
    )
    err = Console(stderr=True)
    for c in warns:
        err.print(
            f"[yellow]warning:[/] {c['model']}: {c['check']}: {c['message']}", highlight=False
        )
    for c in report.config.get("cells_not_run") or []:
        err.print(
            f"[yellow]not run:[/] {c['attack']} under {c['threat']}: {c['reason']}",
            highlight=False,
        )
    console.print(f"report -> {out_dir} ({report.seconds:.1f} s)", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        run: Path = typer.Option(..., help="Run directory (e.g. runs/digits-cnn)."),
        attacks: str = typer.Option(
            "fgsm,pgd",
            help="Comma list: fgsm pgd pgd-l2 apgd-ce apgd-dlr autoattack square cw.",
        ),
        eps: str = typer.Option(
            "0,0.05,0.1,0.2", help="L-inf budgets in pixel units; 0 = clean accuracy."
        ),
        eps_l2: str = typer.Option("0,0.5,1,2", help="L2 radii for pgd-l2 and cw."),
        threat: str = typer.Option(
            "transfer,white-box",
            help="Comma list: transfer (crafted on base), white-box (on each model),"
            " black-box (square, query-only).",
        ),
        samples: int = typer.Option(
            None, help=f"Test inputs (the first N; default min({DEFAULT_SAMPLES}, all))."
        ),
        seed: int = typer.Option(0, help="Seed of the attacks' random starts."),
        models: str = typer.Option(
            None, help="Comma list of models to compare (default: base, adv, every ensemble)."
        ),
        batch_size: int = typer.Option(256, help="Inputs attacked at once (memory permitting)."),
        max_memory_mb: float = typer.Option(
            4096.0, help="Memory an attack may use; batches are cut to fit."
        ),
        steps: int = typer.Option(
            None, help="Attack iterations (default: pgd 10, apgd/autoattack 100, cw 50)."
        ),
        step_size: float = typer.Option(0.25, help="PGD step as a fraction of eps (eps/4)."),
        restarts: int = typer.Option(1, help="Random restarts (pgd, apgd, square)."),
        queries: int = typer.Option(5000, help="Square's query budget."),
        cw_c: float = typer.Option(1.0, help="CW trade-off constant c."),
        cw_kappa: float = typer.Option(0.0, help="CW confidence margin."),
        cw_lr: float = typer.Option(0.01, help="CW Adam learning rate."),
        data_root: Path = typer.Option(None, help="Dataset files (default: the base model's)."),
        out: Path = typer.Option(None, help="Report directory (default: RUN/report)."),
        accelerator: str = typer.Option("cpu", help="Lightning accelerator: cpu | gpu | auto."),
        devices: int = typer.Option(1, help="Processes/devices per node (shards the test set)."),
        strategy: str = typer.Option("auto", help="Lightning strategy, e.g. ddp."),
        num_nodes: int = typer.Option(1, help="Number of nodes."),
        progress: bool = typer.Option(True, help="Show a progress bar over the sweep."),
    ) -> None:
        """Robust accuracy (Wilson 95% intervals), ensemble agreement and AUROC of mutual
        information, under transfer, white-box and black-box attacks, with sanity checks."""
        report = evaluate_run(
            run, attacks, eps, eps_l2, threat, samples, seed, models, batch_size,
            max_memory_mb, steps, step_size, restarts, queries, cw_c, cw_kappa, cw_lr,
            data_root, out, accelerator, devices, strategy, num_nodes,
            progress and sys.stderr.isatty(),
        )  # fmt: skip
        if report is not None:
            print_summary(report, out or RunLayout.of(run).report)
