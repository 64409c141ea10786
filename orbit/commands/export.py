"""`orbit export`: a run's ensemble (and its base model) as ONNX, plus Triton / KServe files."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from orbit.errors import UserError
from orbit.layout import ENSEMBLE_METHODS, RunLayout

MODEL_FILE = "model.onnx"
BASE_FILE = "base.onnx"


def _service_name(run: Path) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", run.resolve().name.lower()).strip("-")
    return f"orbit-{slug}"[:42].rstrip("-") or "orbit"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run: Path = typer.Option(..., help="Run directory with base/ and a built ensemble."),
        method: str = typer.Option("symmetry", help=" | ".join(ENSEMBLE_METHODS)),
        triton: Path = typer.Option(None, help="Also write a Triton model repository here."),
        kserve: Path = typer.Option(None, help="Also write a KServe InferenceService YAML here."),
        name: str = typer.Option("orbit", help="Model name (Triton folder, V2 URL)."),
        max_batch: int = typer.Option(256, help="Largest batch (Triton max_batch_size, server)."),
        image: str = typer.Option(None, help="Serving image for --kserve (orbit-serve:VERSION)."),
        storage_uri: str = typer.Option(
            None, help="Where --kserve's model.onnx lives (default pvc://orbit-models/RUNNAME)."
        ),
    ) -> None:
        """Write RUN/export/model.onnx (the whole ensemble, one graph) and RUN/export/base.onnx,
        checked with onnx.checker and for parity with PyTorch (max |probs diff| <= 1e-5)."""
        if method not in ENSEMBLE_METHODS:
            choices = ", ".join(ENSEMBLE_METHODS)
            raise UserError(f"unknown --method {method!r}; choose one of: {choices}")
        if max_batch <= 0:
            raise UserError(f"--max-batch must be positive, got {max_batch}")
        from ensemble.export import check_name

        check_name(name)  # before any work: it names the Triton folder and the V2 URL
        from orbit import __version__

        layout = RunLayout.of(run)
        ens_dir = layout.ensemble(method)
        if not (ens_dir / "ensemble.json").is_file():
            raise UserError(
                f"no {method} ensemble in {ens_dir}; build it first:"
                f" orbit build --run {run} --method {method}"
            )
        from ensemble.artifacts import load_ensemble
        from ensemble.export import (
            export_pair,
            kserve_manifest,
            write_triton_repository,
        )
        from orbit import atomic
        from training.artifacts import load_model
        from training.datasets import load_dataset

        base = load_model(layout.base)
        loaded = load_ensemble(ens_dir, base)
        root = (base.info.get("train_config") or {}).get("data_root")
        splits = load_dataset(loaded.info.get("dataset") or base.info["dataset"], root)
        model_path = layout.export / MODEL_FILE
        model, single = export_pair(base, loaded, splits, model_path, layout.export / BASE_FILE)
        for result in (model, single):
            gaps = ", ".join(f"batch {b}: {d:.1e}" for b, d in result.parity.items())
            meta = result.metadata
            print(
                f"{result.path}: {meta['orbit.method']} x{meta['orbit.members']},"
                f" mutual_info threshold {float(meta['orbit.mutual_info_threshold']):.4g},"
                f" parity max |probs diff| {gaps}"
            )
        if triton is not None:
            target = write_triton_repository(
                model_path,
                triton,
                name=name,
                input_shape=list(base.model.spec.input_shape),
                num_classes=len(splits.class_names),
                max_batch_size=max_batch,
            )
            print(f"Triton model repository: {target}")
        if kserve is not None:
            text = kserve_manifest(
                service=_service_name(run),
                model_name=name,
                image=image or f"orbit-serve:{__version__}",
                storage_uri=storage_uri or f"pvc://orbit-models/{run.resolve().name}",
                max_batch=max_batch,
                metadata=model.metadata,
            )
            atomic.write_text(kserve, text)
            print(f"KServe InferenceService: {kserve}")
