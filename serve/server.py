"""Build and run kserve's ModelServer for one orbit ONNX file: REST (V2) only, on the given host.

kserve 0.16's ModelServer has no host setting (its REST server hard-codes 0.0.0.0 in the uvicorn
Config it creates inside start()). OrbitModelServer sets the host, and puts serve.guard in front
of kserve's app, on that uvicorn Config just before it is served; gRPC is disabled, so nothing
else listens. The model is loaded and warmed up before the port opens, so the server is ready
as soon as it answers at all.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from pathlib import Path

from orbit.errors import UserError
from serve._kserve import ModelServer
from serve.guard import RequestGuard
from serve.model import OrbitOnnxModel

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


class OrbitModelServer(ModelServer):
    """kserve's ModelServer, bound to `host` and fronted by the request guard."""

    def __init__(self, host: str, max_body_bytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.max_body_bytes = max_body_bytes

    async def _serve(self) -> None:
        # start() has created the REST server (not yet serving) when it calls _serve().
        rest = self._rest_server
        if self._rest_multiprocess_server is not None:
            rest = self._rest_multiprocess_server._rest_server
        if rest is None:
            raise RuntimeError("kserve created no REST server")
        rest.config.host = self.host
        rest.config.app = RequestGuard(self.max_body_bytes)
        await super()._serve()


def _check_config(cfg: ServeConfig) -> None:
    if not 1 <= cfg.port <= 65535:
        raise UserError(f"--port {cfg.port} is not a TCP port; choose one in 1..65535")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers} must be at least 1")
    if cfg.max_batch < 1:
        raise UserError(f"--max-batch {cfg.max_batch} must be at least 1")
    if cfg.max_body_bytes is not None and cfg.max_body_bytes < 1024:
        raise UserError(f"--max-body-bytes {cfg.max_body_bytes} is too small; allow >= 1024")
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
    """Load and warm up the model (UserError if the file is unusable) and build the server."""
    _check_config(cfg)
    model = OrbitOnnxModel(cfg.name, cfg.model, cfg.max_batch, cfg.intra_op_threads)
    model.load()
    assert model.info is not None
    limit = cfg.max_body_bytes or default_max_body_bytes(cfg.max_batch, model.info.input_shape)
    _check_bindable(cfg.host, cfg.port)
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
