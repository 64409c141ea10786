"""Lightning wrappers: the classifier's training loop (optionally adversarial) and its data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader

from training.datasets import DatasetSplits, load_dataset


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of an OrbitClassifier (at `.model`).

    With `adv_eps > 0` every training batch is replaced by torchattacks PGD examples crafted on the
    current weights (Madry et al.'s adversarial training), the robust baseline orbit compares with.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        epochs: int = 10,
        adv_eps: float = 0.0,
        adv_steps: int = 7,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.epochs = lr, epochs
        self.adv_eps, self.adv_steps = adv_eps, adv_steps
        self.loss = nn.CrossEntropyLoss()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        attack = torchattacks.PGD(
            self.model,
            eps=self.adv_eps,
            alpha=2.5 * self.adv_eps / self.adv_steps,
            steps=self.adv_steps,
            random_start=True,
        )
        attack.set_model_training_mode(model_training=False)  # craft with eval-mode layers
        return attack(x, y).detach()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> torch.Tensor:
        x, y = batch
        if self.adv_eps > 0:
            x = self._adversarial(x, y)
        logits = self.model(x)
        loss = self.loss(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val_loss", self.loss(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


class SplitsDataModule(pl.LightningDataModule):
    """Serves an in-memory DatasetSplits; each (DDP) process loads the dataset itself."""

    def __init__(
        self, dataset: str, data_root: str | None, batch_size: int, splits: DatasetSplits | None
    ) -> None:
        super().__init__()
        self.dataset, self.data_root, self.batch_size = dataset, data_root, batch_size
        self.splits = splits

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_dataset(self.dataset, self.data_root)

    def train_dataloader(self) -> DataLoader:
        assert self.splits is not None
        return DataLoader(self.splits.train.dataset(), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.splits is not None
        return DataLoader(self.splits.val.dataset(), batch_size=512)
