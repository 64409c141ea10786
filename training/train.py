"""The training pipeline: dataset -> Lightning Trainer -> model.safetensors, model.json, metrics.

`train(config)` is what `orbit train` runs and what the deep-ensemble builder calls for each of
its members. Checkpoints (last and best) make a killed run resumable with `resume=True`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
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


def _prepare_out(config: TrainConfig) -> Path | None:
    """Check the output directory; return the checkpoint to resume from, if any."""
    out = config.out
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
        return ckpt
    holds_run = out.is_dir() and any(
        (out / name).exists() for name in (DESCRIPTION, CHECKPOINTS, RUN_CONFIG)
    )
    if holds_run:
        if not config.overwrite:
            raise UserError(
                f"{out} already holds a run; pass --overwrite to replace it, --resume to continue"
                " it, or choose another --out"
            )
        shutil.rmtree(out)
    return None


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
    if _is_launching_process():
        resume_from = _prepare_out(config)
    else:
        last = config.out / CHECKPOINTS / "last.ckpt"
        resume_from = last if config.resume and last.is_file() else None
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
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=config.precision,
        logger=CSVLogger(save_dir=config.out, name="logs"),  # logs/version_N per attempt
        callbacks=callbacks,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        deterministic=False,
        log_every_n_steps=10,
    )
    if trainer.is_global_zero:
        atomic.write_json(config.out / RUN_CONFIG, config.to_json())
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    model = module.model.cpu().float().eval()
    test_acc, test_loss = evaluate_split(model, splits.test)
    seconds = time.perf_counter() - started
    if trainer.is_global_zero:
        _write_artifacts(config, splits, model, test_acc, test_loss, seconds, trainer)
    return TrainResult(config.out, test_acc, test_loss, seconds, model, trainer.is_global_zero)


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
    save_model(config.out, model, info)
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
    atomic.write_json(config.out / METRICS, metrics)
