"""Run a whole evaluation: the sweep, partial reports as jobs finish, sanity checks, figures.

Only the process the user started writes files; under DDP the other processes compute their
shards and leave. Each finished job rewrites report.partial.json/md (status "running"), so an
attack that fails midway leaves every number computed before it on disk (status "failed"), and
the last complete report.json/md stays as it was until the new sweep completes.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.catalog import resolved_hyperparameters
from attacks.config import EvalConfig
from attacks.evaluate import (
    EvalModel,
    Job,
    JobResult,
    Sweep,
    clean_accuracy,
    is_launching_process,
    result_rows,
)
from attacks.report import Report, write_report
from attacks.sanity import run_checks
from attacks.stats import decode_mask, encode_mask, wilson_interval
from attacks.threats import plan, skipped_cells
from orbit.errors import UserError


def environment(world_size: int) -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for pkg in (
        "orbit", "torch", "pytorch-lightning", "torchmetrics", "torchattacks",
        "scikit-learn", "matplotlib", "numpy",
    ):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
    }


def _eps0_rows(clean_rows: list[dict], config: EvalConfig) -> list[dict]:
    """eps = 0 is the clean input: every requested cell gets the clean numbers at eps 0."""
    rows = []
    for cell in plan(list(config.attacks), list(config.threats)):
        if 0.0 not in config.eps_for(cell.attack):
            continue
        for r in clean_rows:
            rows.append(
                {**r, "role": "sweep", "attack": cell.attack, "threat": cell.threat,
                 "from_clean": True}
            )  # fmt: skip
    return rows


def worst_case_rows(rows: list[dict], models: list[str]) -> list[dict]:
    """Per model and budget, the inputs that stayed correct under EVERY attack and threat model
    run at that budget: the per-input worst case, the number an adaptive attacker who tries
    them all achieves (at least), and the robustness a model can honestly claim."""
    out: list[dict] = []
    for m in models:
        mine = [r for r in rows if r["model"] == m and r["role"] == "sweep" and r["eps"] > 0]
        mine = [r for r in mine if not r.get("from_clean") and r["n"] > 0]
        for norm, eps in sorted({(r["norm"], r["eps"]) for r in mine}):
            cells = [r for r in mine if (r["norm"], r["eps"]) == (norm, eps)]
            n = cells[0]["n"]
            ok = np.ones(n, dtype=bool)
            for r in cells:
                ok &= decode_mask(r["correct_mask"], n)
            k = int(ok.sum())
            lo, hi = wilson_interval(k, n)
            out.append(
                {
                    "role": "worst-case", "model": m, "attack": "worst-case", "threat": "any",
                    "eps": eps, "norm": norm, "n": n, "correct": k, "accuracy": k / n,
                    "ci95": [lo, hi], "agreement": None, "agreement_ci95": None,
                    "over": [f"{r['attack']}/{r['threat']}" for r in cells],
                    "correct_mask": encode_mask(np.arange(n), ok.astype(float)),
                }
            )  # fmt: skip
    return out


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        yield bar


def evaluate(
    models: list[EvalModel],
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    config: EvalConfig,
    out_dir: str | Path,
    data_info: dict[str, Any],
    reference_clean: dict[str, tuple[int, int]] | None = None,
) -> Report | None:
    """Evaluate `models` (the first is the base: the transfer source) on (x, y).

    Returns the final report in the process the user started, None in other DDP processes.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    writer = is_launching_process()
    sweep = Sweep(models, x, y, num_classes, config)
    world = config.devices * config.num_nodes
    cells = plan(list(config.attacks), list(config.threats))
    ran = list(dict.fromkeys(c.attack for c in cells))  # square joins with --threat black-box
    report = Report(
        config={
            **config.to_json(),
            "attacks_run": ran,
            "cells": [{"attack": c.attack, "threat": c.threat} for c in cells],
            "cells_not_run": skipped_cells(list(config.attacks), list(config.threats)),
            "hyperparameters": {a: resolved_hyperparameters(a, config.options) for a in ran},
            "jobs": [{"label": j.label, "batch_size": j.batch_size} for j in sweep.jobs],
        },
        environment=environment(world),
        data=data_info,
        models={
            m.name: {"kind": "ensemble" if m.is_ensemble else "model", **m.meta} for m in models
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )

    with _progress(writer and config.progress, sweep.batches_on_rank0(world)) as bar:
        task = bar.add_task("evaluating", total=sweep.batches_on_rank0(world)) if bar else None

        def on_batch() -> None:
            if bar is not None:
                bar.advance(task)

        def on_job_done(result: JobResult) -> None:
            rows = result_rows(result)
            report.rows += rows
            if result.job.role == "clean":
                report.rows += _eps0_rows(rows, config)
            report.seconds = round(time.perf_counter() - started, 2)
            if writer:
                write_report(out, report)

        def on_job_start(number: int, job: Job) -> None:
            if bar is not None:
                bar.update(task, description=f"[{number + 1}/{len(sweep.jobs)}] {job.label}")

        try:
            sweep.run(on_job_done=on_job_done, on_batch=on_batch, on_job_start=on_job_start)
        except BaseException as e:
            if writer:
                report.status = "failed"
                report.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                report.seconds = round(time.perf_counter() - started, 2)
                write_report(out, report)
            if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
                raise UserError(
                    f"the attack ran out of memory ({report.error}); lower --max-memory-mb or"
                    f" --batch-size (numbers computed so far are in {out})"
                ) from None
            raise

    if not sweep.is_global_zero:
        return None
    report.environment["world_size"] = sweep.world_size
    independent = {m.name: (clean_accuracy(m.module, x, y), len(y)) for m in models}
    checks = run_checks(
        report.rows, [m.name for m in models], independent, reference_clean, config.options, ran,
        models_meta=report.models,
    )  # fmt: skip
    report.sanity = [c.to_json() for c in checks]
    report.rows += worst_case_rows(report.rows, [m.name for m in models])
    report.status = "complete"
    report.seconds = round(time.perf_counter() - started, 2)
    from attacks.plots import write_plots

    write_plots(report, out)
    write_report(out, report)
    return report
