"""Build and run kserve's ModelServer for one orbit ONNX file: REST (V2) only, on the given host.

The file, the flags and the port are checked before kserve is imported (it takes seconds), so a
user's mistake ends in one line at once. The model is loaded and warmed up before the port
opens, so the server is ready as soon as it answers at all.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orbit.errors import UserError
from serve import metadata

if TYPE_CHECKING:
    from serve.model import OrbitOnnxModel
    from serve.modelserver import OrbitModelServer

DEFAULT_MODEL_NAME = "orbit"
_JSON_BYTES_PER_VALUE = 32  # a float written as JSON text, with separator, rounded up


@dataclass(frozen=True)
class ServeConfig:
    model: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_batch: int = 256
    max_body_bytes: int | None = None  # None: enough for --max-batch images sent as JSON
    name: str = DEFAULT_MODEL_NAME
    intra_op_threads: int = 0  # 0: onnxruntime's default


def default_max_body_bytes(max_batch: int, input_shape: tuple[int, ...]) -> int:
    """A body big enough for a full --max-batch request in JSON, with room for the envelope."""
    return max(1 << 20, max_batch * math.prod(input_shape) * _JSON_BYTES_PER_VALUE + (64 << 10))


def _check_config(cfg: ServeConfig) -> None:
    if not 1 <= cfg.port <= 65535:
        raise UserError(f"--port {cfg.port} is not a TCP port; choose one in 1..65535")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers} must be at least 1")
    if cfg.max_batch < 1:
        raise UserError(f"--max-batch {cfg.max_batch} must be at least 1")
    if cfg.max_body_bytes is not None and cfg.max_body_bytes < 1024:
        raise UserError(f"--max-body-bytes {cfg.max_body_bytes} is too small; allow >= 1024")
    if cfg.intra_op_threads < 0:
        raise UserError(f"--threads {cfg.intra_op_threads} must be >= 0 (0: onnxruntime's default)")
    if not cfg.name or "/" in cfg.name:
        raise UserError(f"--name {cfg.name!r} must be a non-empty name without '/'")


def _check_bindable(host: str, port: int) -> None:
    """Fail with one line now rather than with uvicorn's log lines after start-up."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} cannot be resolved ({e.strerror})") from e
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host"
            ) from e


def build(cfg: ServeConfig) -> tuple[OrbitModelServer, OrbitOnnxModel]:
    """Check everything (UserError on any problem), load and warm up the model, build the server."""
    _check_config(cfg)
    opened = metadata.load(cfg.model, cfg.intra_op_threads)
    _, info = opened
    limit = cfg.max_body_bytes or default_max_body_bytes(cfg.max_batch, info.input_shape)
    _check_bindable(cfg.host, cfg.port)

    from serve.model import OrbitOnnxModel
    from serve.modelserver import OrbitModelServer

    model = OrbitOnnxModel(cfg.name, cfg.model, cfg.max_batch, cfg.intra_op_threads, opened)
    model.load()
    server = OrbitModelServer(
        host=cfg.host,
        max_body_bytes=limit,
        http_port=cfg.port,
        workers=cfg.workers,
        enable_grpc=False,
        enable_latency_logging=False,
    )
    return server, model


def run(cfg: ServeConfig) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    server, model = build(cfg)
    server.start([model])
