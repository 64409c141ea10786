"""Fixtures for the serving tests and benchmark: small, valid orbit ONNX files built with
onnx.helper (no torch), so they do not depend on the exporter, and a live `orbit serve`.

The graph follows the export contract exactly: input `pixels` float32 [batch, C, H, W]; outputs
`probs`, `label`, `agreement`, `mutual_info`; orbit metadata_props.

Members are linear classifiers on the flattened pixels; with members > 1 they disagree on some
inputs, so agreement and mutual_info vary like a real ensemble's.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 9


def _metadata(
    channels: int, height: int, width: int, classes: int, members: int, threshold: float
) -> dict[str, str]:
    return {
        "orbit.format": "orbit.onnx/1",
        "orbit.class_names": json.dumps([f"class{i}" for i in range(classes)]),
        "orbit.input_shape": json.dumps([channels, height, width]),
        "orbit.value_range": "[0, 1]",
        "orbit.method": "symmetry" if members > 1 else "base",
        "orbit.members": str(members),
        "orbit.eps": "0.5",
        "orbit.version": "0.1.0",
        "orbit.weights_sha256": "0" * 64,
        "orbit.mutual_info_threshold": repr(float(threshold)),
    }


def build_model(
    *,
    channels: int = 1,
    height: int = 8,
    width: int = 8,
    classes: int = 10,
    members: int = 4,
    threshold: float = 0.05,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    input_name: str = "pixels",
    weight_scale: float = 0.6,
    input_dims: list[int | str] | None = None,
) -> onnx.ModelProto:
    """An ensemble of `members` linear softmax classifiers as one graph with the orbit contract.

    `metadata` replaces the default metadata_props entirely (pass {} for a non-orbit file);
    `input_dims` replaces the declared input shape ["batch", C, H, W] (to break the contract).
    """
    rng = np.random.default_rng(seed)
    d = channels * height * width
    w = (rng.standard_normal((d, members * classes)) * weight_scale).astype(np.float32)
    b = (rng.standard_normal(members * classes) * 0.5).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([-1, members, classes], np.int64), "member_shape"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "tiny"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    n = helper.make_node
    nodes = [
        n("Flatten", [input_name], ["flat"], axis=1),
        n("MatMul", ["flat", "W"], ["mm"]),
        n("Add", ["mm", "B"], ["logits_flat"]),
        n("Reshape", ["logits_flat", "member_shape"], ["logits"]),  # [N, M, K]
        n("Softmax", ["logits"], ["member_probs"], axis=-1),
        n("ReduceMean", ["member_probs", "ax1"], ["probs"], keepdims=0),  # [N, K]
        n("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),  # [N] int64
        # agreement: share of members whose vote equals the ensemble's label
        n("ArgMax", ["member_probs"], ["votes"], axis=2, keepdims=0),  # [N, M]
        n("Unsqueeze", ["label", "ax1"], ["label_col"]),
        n("Equal", ["votes", "label_col"], ["agree_bool"]),
        n("Cast", ["agree_bool"], ["agree_f"], to=TensorProto.FLOAT),
        n("ReduceMean", ["agree_f", "ax1"], ["agreement"], keepdims=0),
        # mutual_info: entropy of the mean minus the mean member entropy, clamped at 0
        n("Add", ["probs", "tiny"], ["probs_eps"]),
        n("Log", ["probs_eps"], ["log_probs"]),
        n("Mul", ["probs", "log_probs"], ["plogp"]),
        n("ReduceSum", ["plogp", "ax1"], ["neg_h_mean"], keepdims=0),
        n("Add", ["member_probs", "tiny"], ["mp_eps"]),
        n("Log", ["mp_eps"], ["log_mp"]),
        n("Mul", ["member_probs", "log_mp"], ["mplogp"]),
        n("ReduceSum", ["mplogp", "ax2"], ["neg_h_members"], keepdims=0),  # [N, M]
        n("ReduceMean", ["neg_h_members", "ax1"], ["neg_h_avg"], keepdims=0),  # [N]
        n("Sub", ["neg_h_avg", "neg_h_mean"], ["mi_raw"]),
        n("Max", ["mi_raw", "zero"], ["mutual_info"]),
    ]
    graph = helper.make_graph(
        nodes,
        "orbit_fixture",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.FLOAT, input_dims or ["batch", channels, height, width]
            )
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("agreement", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("mutual_info", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="orbit-tests"
    )
    model.ir_version = IR_VERSION
    props = (
        _metadata(channels, height, width, classes, members, threshold)
        if metadata is None
        else metadata
    )
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_model(path: str | Path, **kwargs) -> Path:
    """Build a fixture (see build_model) and save it to `path`."""
    path = Path(path)
    onnx.save(build_model(**kwargs), str(path))
    return path


# --- a live `orbit serve` for tests and benchmarks ------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    log: Path
    name: str = "orbit"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_server(
    model: str | Path, log_dir: str | Path, *flags: str, timeout: float = 90.0
) -> Iterator[LiveServer]:
    """`python -m orbit.cli serve MODEL` on a free loopback port, ready when yielded, always
    stopped (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    log = Path(log_dir) / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "orbit.cli", "serve", str(model), "--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(proc, port, log)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"orbit serve exited with {proc.returncode}:\n{server.log_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"orbit serve not ready after {timeout}s:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
