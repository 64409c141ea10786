"""A Lightning callback that records the slot's conserved quantity Q during training.

Q is what gradient flow keeps constant, so its drift shows how far training departs from gradient
flow (step size, Adam's rescaling, weight decay, minibatch noise). Logged at every epoch end into
the run's metrics: q_norm (||Q||), q_mean (mean Q_i, or trace(Q)/h for a linear slot), q_norm_start
and q_drift = ||Q - Q_start|| / ||Q_start||, with Q_start taken before the first step (kept across
--resume in the callback's checkpoint state). When Q_start is nearly zero (balanced layers, e.g.
--init-q 0) the drift is measured against 1e-3 of the layers' size instead, so it stays finite.
Slots without a data-free Q are left alone.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from symmetry.conserved import q_mean, slot_q, slot_q_scale

BALANCED = 1e-3  # ||Q_start|| below this fraction of the layers' size counts as balanced


def _slot_of(pl_module: pl.LightningModule) -> torch.nn.Module | None:
    model = getattr(pl_module, "model", None)
    slot = getattr(model, "slot", None)
    if slot is None or not hasattr(slot, "fc1") or not hasattr(slot, "fc2"):
        return None
    return slot


class QMonitor(pl.Callback):
    """Logs Q of `pl_module.model.slot` at every training-epoch end (no-op without a Q)."""

    def __init__(self) -> None:
        self.q_start: torch.Tensor | None = None
        self.drift_scale: float | None = None  # the denominator of q_drift

    def _q(self, pl_module: pl.LightningModule) -> torch.Tensor | None:
        slot = _slot_of(pl_module)
        q = None if slot is None else slot_q(slot)
        return None if q is None else q.to(torch.float64).cpu()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        q = self._q(pl_module)
        if q is not None and (self.q_start is None or self.q_start.shape != q.shape):
            self.q_start = q
            self.drift_scale = None
        if q is not None and self.drift_scale is None:
            size = slot_q_scale(_slot_of(pl_module)) or 0.0
            self.drift_scale = max(float(self.q_start.norm()), BALANCED * size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        q = self._q(pl_module)
        if q is None or self.q_start is None:
            return
        values = {
            "q_norm": float(q.norm()),
            "q_mean": q_mean(q),
            "q_norm_start": float(self.q_start.norm()),
            "q_drift": float((q - self.q_start).norm()) / max(self.drift_scale or 0.0, 1e-300),
        }
        for name, value in values.items():
            # Every process holds the same weights, so syncing changes nothing but Lightning's
            # warning on every DDP run.
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        if self.q_start is None:
            return {}
        return {"q_start": self.q_start.tolist(), "drift_scale": self.drift_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "q_start" in state_dict:
            self.q_start = torch.tensor(state_dict["q_start"], dtype=torch.float64)
            self.drift_scale = state_dict.get("drift_scale")
