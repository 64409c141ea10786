"""The training pipeline: dataset -> Lightning Trainer -> model.safetensors, model.json, metrics.

`train(config)` is what `orbit train` runs and what the deep-ensemble builder calls for each of
its members. Checkpoints (last and best) make a killed run resumable with `resume=True`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orbit import atomic
from orbit.errors import UserError
from training.artifacts import DESCRIPTION, save_model
from training.config import TrainConfig
from training.datasets import DatasetSplits, Split, load_dataset
from training.models import ModelSpec, OrbitClassifier, build_model

CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
RUN_CONFIG = "train_config.json"


@dataclass
class TrainResult:
    out: Path
    test_accuracy: float
    test_loss: float
    seconds: float
    model: OrbitClassifier
    is_global_zero: bool = True  # False in the other DDP processes


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, batch_size: int = 1024) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on a whole split (exact, single process)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        logits = model(x)
        correct += int((logits.argmax(-1) == y).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    return correct / len(split), loss_sum / len(split)


def _holds_run(out: Path) -> bool:
    return out.is_dir() and any(
        (out / name).exists() for name in (DESCRIPTION, CHECKPOINTS, RUN_CONFIG)
    )


def _aside(out: Path) -> Path:
    """Where --overwrite keeps the old run until the new one is complete."""
    return out.with_name(f".{out.name}.replaced")


def _check_writable(out: Path) -> None:
    """--out must be (or be creatable as) a directory we can write into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out} is under {existing}, which is a file; give another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable; give a directory you can write")


def _check_out(config: TrainConfig) -> Path | None:
    """Check the output directory (touching nothing); return the checkpoint to resume from."""
    out = config.out
    _check_writable(out)
    if _aside(out).exists():
        raise UserError(
            f"{_aside(out)} holds the run an interrupted --overwrite was replacing; move it back"
            f" to {out} (or delete it), then train again"
        )
    ckpt = out / CHECKPOINTS / "last.ckpt"
    if config.resume:
        if not ckpt.is_file():
            raise UserError(f"nothing to resume: {ckpt} does not exist; start without --resume")
        saved = out / RUN_CONFIG
        if saved.is_file():
            import json

            before = json.loads(saved.read_text())
            keys = ("dataset", "model", "hidden", "activation", "adv_train", "adv_eps", "init_q")
            changed = [k for k in keys if before.get(k) != config.to_json().get(k)]
            if changed:
                raise UserError(
                    f"--resume with different {', '.join(changed)} than the run in {out};"
                    " pass the original flags or train into a new --out"
                )
        _check_checkpoint(ckpt)
        return ckpt
    if _holds_run(out) and not config.overwrite:
        raise UserError(
            f"{out} already holds a run; pass --overwrite to replace it, --resume to continue"
            " it, or choose another --out"
        )
    return None


def _check_checkpoint(ckpt: Path) -> None:
    """A checkpoint we cannot read is a one-line error, not a traceback from inside fit()."""
    try:
        torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot resume: {ckpt} is unreadable ({first}); train again with --overwrite"
        ) from None


@contextlib.contextmanager
def _guarded_out(out: Path, replace: bool) -> Iterator[None]:
    """Train into `out` so that a failure loses nothing that was there before.

    With `replace` the old run is moved aside and only deleted once the new one is complete; if
    training fails it comes back. A fresh run that fails before its first checkpoint leaves
    nothing behind (one with a checkpoint stays, for --resume).
    """
    aside = _aside(out)
    if replace:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
    try:
        yield
    except BaseException:
        if replace:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(aside, out)
        elif not (out / CHECKPOINTS / "last.ckpt").is_file():
            for name in (RUN_CONFIG, CHECKPOINTS, "logs"):
                shutil.rmtree(out / name, ignore_errors=True)
                with contextlib.suppress(OSError):  # gone already, or never a file
                    (out / name).unlink()
            with contextlib.suppress(OSError):
                out.rmdir()  # only if now empty
        raise
    if replace:
        shutil.rmtree(aside, ignore_errors=True)


def _build(config: TrainConfig, splits: DatasetSplits) -> OrbitClassifier:
    mean, std = splits.channel_stats()
    spec = ModelSpec(
        arch=config.model,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        hidden=config.hidden,
        activation=config.activation,
        mean=mean,
        std=std,
    )
    model = build_model(spec)
    if config.init_q is not None:
        from symmetry.flat_minimum import set_slot_q, xavier_init_slot

        xavier_init_slot(model.slot)  # the paper's setting: Xavier, then move along the minimum
        set_slot_q(model.slot, config.init_q)
    return model


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


def _is_launching_process() -> bool:
    """True in the process the user started (not in the DDP workers Lightning launches)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def train(config: TrainConfig, splits: DatasetSplits | None = None) -> TrainResult:
    """Train one base model as `config` says and write its artifacts into `config.out`.

    `splits` may be passed to reuse data already in memory (the deep-ensemble builder does).
    Under DDP every process runs this; only global rank 0 writes the artifacts.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from training.lightning import ClassifierModule, SplitsDataModule

    _quiet_lightning()
    started = time.perf_counter()
    launching = _is_launching_process()
    if launching:
        resume_from = _check_out(config)
    else:
        last = config.out / CHECKPOINTS / "last.ckpt"
        resume_from = last if config.resume and last.is_file() else None
    # Everything the user gave is checked before anything in --out is touched.
    if splits is None:
        splits = load_dataset(config.dataset, config.data_root)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = _build(config, splits)
    module = ClassifierModule(
        model,
        num_classes=splits.num_classes,
        lr=config.lr,
        epochs=config.epochs,
        adv_eps=config.adv_eps if config.adv_train else 0.0,
        adv_steps=config.adv_steps,
    )
    data = SplitsDataModule(config.dataset, config.data_root, config.batch_size, splits)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=config.out / CHECKPOINTS,
            filename="best",
            monitor="val_acc",
            mode="max",
            save_last=True,
            enable_version_counter=False,
        )
    ]
    callbacks += _optional_callbacks()
    trainer = _make_trainer(
        config,
        callbacks,
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=config.precision,
        logger=CSVLogger(save_dir=config.out, name="logs"),  # logs/version_N per attempt
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        deterministic=False,
        log_every_n_steps=10,
    )
    replace = launching and resume_from is None and _holds_run(config.out)
    with _guarded_out(config.out, replace) if launching else contextlib.nullcontext():
        if trainer.is_global_zero:
            atomic.write_json(config.out / RUN_CONFIG, config.to_json())
        trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
        model = module.model.cpu().float().eval()
        test_acc, test_loss = evaluate_split(model, splits.test)
        seconds = time.perf_counter() - started
        if trainer.is_global_zero:
            _write_artifacts(config, splits, model, test_acc, test_loss, seconds, trainer)
    return TrainResult(config.out, test_acc, test_loss, seconds, model, trainer.is_global_zero)


def _make_trainer(config: TrainConfig, callbacks: list, **kwargs):  # noqa: ANN202
    """Lightning's Trainer; flags it refuses (accelerator, strategy, precision) are user errors."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(callbacks=callbacks, **kwargs)
    except (ValueError, MisconfigurationException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"Lightning refuses --accelerator {config.accelerator} --strategy {config.strategy}"
            f" --precision {config.precision} --devices {config.devices}: {first}"
        ) from None


def _optional_callbacks() -> list:
    """Diagnostics that other stages contribute (Q monitoring), when they are installed."""
    try:
        from training.q_monitor import QMonitor
    except ImportError:
        return []
    return [QMonitor()]


def _write_artifacts(
    config: TrainConfig,
    splits: DatasetSplits,
    model: OrbitClassifier,
    test_acc: float,
    test_loss: float,
    seconds: float,
    trainer,  # noqa: ANN001
) -> None:
    val_acc, val_loss = evaluate_split(model, splits.val)
    info = {
        "dataset": splits.name,
        "class_names": splits.class_names,
        "input_shape": list(splits.input_shape),
        "arch": config.model,
        "activation": config.activation,
        "hidden": config.hidden,
        "seed": config.seed,
        "adversarial_training": (
            {"method": config.adv_train, "eps": config.adv_eps, "steps": config.adv_steps}
            if config.adv_train
            else None
        ),
        "data_fingerprint": splits.fingerprint(),
        "train_config": config.to_json(),
    }
    metrics = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "test_samples": len(splits.test),
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "epochs": int(trainer.current_epoch),
        "world_size": int(trainer.world_size),
        "seconds": round(seconds, 2),
    }
    # The conserved quantity at the end of training (training/q_monitor.py), when the slot has one.
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("q_")})
    atomic.write_json(config.out / METRICS, metrics)
    save_model(config.out, model, info)  # last: model.json marks a finished run
