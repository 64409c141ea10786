"""`orbit train`: train a base model (or an adversarially trained baseline) into a run."""

from __future__ import annotations

from pathlib import Path

import typer

from orbit.layout import RunLayout


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        dataset: str = typer.Option(
            "digits", help="digits | fashion-mnist | mnist | cifar10 | synthetic"
        ),
        model: str = typer.Option("cnn", help="mlp | cnn | resnet"),
        hidden: int = typer.Option(64, help="Width h of the symmetry slot."),
        activation: str = typer.Option(
            "leaky_relu", help="Slot activation: leaky_relu tanh sigmoid gelu silu elu relu linear."
        ),
        epochs: int = typer.Option(None, help="Epochs (default: per dataset, e.g. digits 30)."),
        batch_size: int = typer.Option(64, help="Training batch size per process."),
        lr: float = typer.Option(1e-3, help="Adam learning rate (cosine schedule)."),
        seed: int = typer.Option(0, help="Seed for initialisation and data order."),
        run: Path = typer.Option(None, help="Run directory (default: runs/DATASET-MODEL)."),
        out: Path = typer.Option(
            None, help="Model directory (default: RUN/base, RUN/adv with --adv-train)."
        ),
        data_root: Path = typer.Option(
            None, help="Folder with the dataset files (else $ORBIT_DATA_ROOT)."
        ),
        resume: bool = typer.Option(False, help="Continue a killed run from its last checkpoint."),
        overwrite: bool = typer.Option(False, help="Replace a run already in --out."),
        adv_train: str = typer.Option(None, help="'pgd': Madry-style adversarial training."),
        adv_eps: float = typer.Option(0.1, help="L-inf budget of --adv-train, in pixel units."),
        init_q: float = typer.Option(None, help="Set the slot's conserved quantity Q at init."),
        accelerator: str = typer.Option(
            "auto", help="Lightning accelerator: auto (a GPU if there is one) | cpu | gpu."
        ),
        devices: int = typer.Option(1, help="Processes/devices per node."),
        strategy: str = typer.Option("auto", help="Lightning strategy, e.g. ddp."),
        num_nodes: int = typer.Option(1, help="Number of nodes."),
        precision: str = typer.Option("32-true", help="Lightning precision, e.g. bf16-mixed."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Train a base model with PyTorch Lightning; writes model.safetensors, model.json,
        metrics.json and checkpoints/."""
        from training.config import TrainConfig
        from training.train import train

        layout = RunLayout.of(run or Path("runs") / f"{dataset}-{model}")
        target = out or (layout.adv if adv_train else layout.base)
        config = TrainConfig(
            out=target,
            dataset=dataset,
            model=model,
            hidden=hidden,
            activation=activation,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            data_root=data_root,
            resume=resume,
            overwrite=overwrite,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            adv_train=adv_train,
            adv_eps=adv_eps,
            init_q=init_q,
            progress=progress,
        )
        result = train(config)
        if result.is_global_zero:
            print(
                f"trained {model} on {dataset}: test accuracy {result.test_accuracy:.4f},"
                f" loss {result.test_loss:.4f} ({result.seconds:.1f} s) -> {result.out}"
            )
