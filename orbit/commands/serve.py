"""`orbit serve MODEL.onnx`: serve an exported model over the Open Inference (V2) REST protocol.

Imports serve/ (onnxruntime + kserve) only inside the command, and never torch.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "serve",
        help="Serve an exported model.onnx (V2 / Open Inference REST, via kserve's ModelServer)."
        " Ready once the model is loaded and warmed up; stop with Ctrl-C.",
    )
    def _cmd(
        model: Path = typer.Argument(..., help="An ONNX file written by `orbit export`."),
        host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 to expose it)."),
        port: int = typer.Option(8080, help="HTTP port."),
        workers: int = typer.Option(1, help="Server processes (each loads the model)."),
        max_batch: int = typer.Option(256, help="Largest batch one request may carry."),
        max_body_bytes: int = typer.Option(
            0, help="Largest request body in bytes (0: enough for --max-batch images as JSON)."
        ),
        name: str = typer.Option("orbit", help="Model name in the URL: /v2/models/NAME/infer."),
        threads: int = typer.Option(
            0,
            help="onnxruntime threads per worker (0: one per core of the machine; set it to the"
            " container's CPU limit).",
        ),
    ) -> None:
        from serve.server import ServeConfig, run

        run(
            ServeConfig(
                model=model,
                host=host,
                port=port,
                workers=workers,
                max_batch=max_batch,
                max_body_bytes=max_body_bytes or None,
                name=name,
                intra_op_threads=threads,
            )
        )
