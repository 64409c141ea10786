"""Export any FusedEnsemble (or a single base model, as an ensemble of one) as ONE ONNX graph.

The contract the serving side builds against:
  input   `pixels`       float32 [batch, C, H, W], values in [0, 1], dynamic batch
  outputs `probs`        float32 [batch, classes]  mean of member softmax probabilities
          `label`        int64   [batch]           argmax of probs
          `agreement`    float32 [batch]           share of members voting for `label`
          `mutual_info`  float32 [batch]           entropy of the mean - mean member entropy
  metadata_props: orbit.format = "orbit.onnx/1", orbit.class_names (JSON list), orbit.input_shape
  (JSON [C, H, W]), orbit.value_range ("[0, 1]"), orbit.method, orbit.members, orbit.eps,
  orbit.version, orbit.weights_sha256, orbit.mutual_info_threshold (float, as a string).

orbit.weights_sha256 is the SHA-256 of the graph's initializers, sorted by name, each hashed as
its name, then its data type and dims, then its raw little-endian bytes (`weights_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ensemble.base import FusedEnsemble
from orbit import __version__, atomic
from orbit.errors import UserError

if TYPE_CHECKING:
    from ensemble.artifacts import LoadedEnsemble
    from training.artifacts import LoadedModel
    from training.datasets import DatasetSplits

FORMAT = "orbit.onnx/1"
INPUT = "pixels"
OUTPUTS = ("probs", "label", "agreement", "mutual_info")
OPSET = 18
MI_FALSE_POSITIVE_RATE = 0.05
PARITY_BATCHES = (1, 7, 256)
PARITY_TOLERANCE = 1e-5
_TINY = float(torch.finfo(torch.float32).tiny)


class SingleModel(FusedEnsemble):
    """A plain classifier as an ensemble of one (agreement 1, mutual_info 0), for base.onnx."""

    method = "base"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec = getattr(model, "spec", None)
        self.eval()

    @property
    def num_members(self) -> int:
        return 1

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(0)


def summarize_ncb(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ensemble.base.summarize for member logits laid out [N, C, B] (classes before batch).

    Same quantities, in the layout where every reduction over classes or members runs over
    contiguous batch-wide slabs (what onnxruntime is fastest at), with as few passes over the
    [N, C, B] tensor as the arithmetic allows: one exp serves the probabilities, their mean and
    the entropies (H_n = log s_n - sum_c p_nc l_nc, with l the max-shifted logits), and a member
    votes for `label` exactly when its shifted logit there is 0, its maximum (no second argmax).
    """
    n = logits.shape[0]
    shifted = logits - logits.amax(dim=1, keepdim=True)  # [N, C, B], max 0 per member and input
    e = shifted.exp()
    s = e.sum(dim=1, keepdim=True)  # [N, 1, B]
    p = e / s
    mean_p = p.sum(dim=0, keepdim=True) / n  # [1, C, B]
    label = mean_p.argmax(dim=1)  # [1, B]
    at_label = torch.gather(shifted, 1, label.unsqueeze(0).expand(n, 1, -1))  # [N, 1, B]
    agreement = (at_label >= 0).to(torch.float32).sum(dim=0).squeeze(0) / n
    entropy_of_mean = -(mean_p * mean_p.clamp_min(_TINY).log()).sum(dim=1).squeeze(0)  # [B]
    member_entropy = s.log().squeeze(1) - (p * shifted).sum(dim=1)  # [N, B]
    mean_entropy = member_entropy.sum(dim=0) / n
    if n == 1:  # an ensemble of one: exactly 0 by definition (not a rounding residue)
        mutual_info = torch.zeros_like(mean_entropy)
    else:
        mutual_info = (entropy_of_mean - mean_entropy).clamp_min(0.0)
    return mean_p.squeeze(0).transpose(0, 1), label.squeeze(0), agreement, mutual_info


class ExportHead(nn.Module):
    """pixels -> (probs, label, agreement, mutual_info) for any FusedEnsemble: what is exported."""

    def __init__(self, ensemble: FusedEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ncb = getattr(self.ensemble, "member_logits_ncb", None)
        logits = ncb(pixels) if ncb is not None else self.ensemble.member_logits(pixels)
        if ncb is None:
            logits = logits.permute(0, 2, 1).contiguous()
        return summarize_ncb(logits)


def weights_sha256(model: Any) -> str:
    """SHA-256 of an ONNX model's initializers (see the module docstring for the exact recipe)."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        h.update(init.name.encode())
        h.update(f"{arr.dtype.str}{list(arr.shape)}".encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def calibrate_mutual_info(session: Any, x_val: torch.Tensor, fpr: float) -> float:
    """Threshold above which mutual_info flags an input: at most `fpr` of the clean held-out
    inputs lie above it, and no lower threshold keeps that promise on them.

    Calibrated on the mutual_info the exported graph itself computes (onnxruntime `session`), the
    numbers the server compares, not on PyTorch's, which differ from them in the last bits. The
    threshold sits halfway between the last clean value it lets through and the first it flags,
    so those last-bit differences (batch size, thread count) cannot move a calibration input
    across it."""
    if len(x_val) == 0:
        raise UserError("cannot calibrate the mutual_info threshold: the validation split is empty")
    mi = np.concatenate(
        [session.run(["mutual_info"], {INPUT: c.numpy()})[0] for c in x_val.split(512)]
    )
    s = np.sort(mi.astype(np.float64))
    allowed = int(np.floor(fpr * len(s) + 1e-9))  # inputs that may lie above the threshold
    j = len(s) - 1 - allowed  # the largest value that must not be flagged
    if allowed == 0:
        return float(s[-1])
    return float(np.float32((s[j] + s[j + 1]) / 2))


@dataclass
class ExportResult:
    path: Path
    metadata: dict[str, str]
    parity: dict[int, float]  # batch -> max |probs difference| ONNX vs PyTorch


def _to_onnx(head: ExportHead, example: torch.Tensor) -> Any:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            head,
            (example,),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"pixels": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.optimize()
    return program.model_proto


def parity(
    session: Any, ensemble: FusedEnsemble, x: torch.Tensor, batches=PARITY_BATCHES
) -> dict[int, float]:
    """max |probs| difference between onnxruntime and PyTorch's predict(), per batch size."""
    out: dict[int, float] = {}
    for b in batches:
        xb = x[:b] if len(x) >= b else torch.cat([x] * (b // len(x) + 1))[:b]
        with torch.no_grad():
            ref = ensemble.predict(xb).probs.numpy()
        got = session.run(["probs"], {INPUT: xb.numpy()})[0]
        out[b] = float(np.abs(got - ref).max())
    return out


def export_onnx(
    ensemble: FusedEnsemble,
    path: str | Path,
    *,
    class_names: list[str],
    input_shape: tuple[int, int, int] | list[int],
    eps: float | None,
    x_val: torch.Tensor,
    x_check: torch.Tensor,
    extra_metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Write `ensemble` as one ONNX graph to `path` (atomically), with the contract's metadata.

    x_val calibrates the mutual_info threshold (clean held-out data); x_check checks parity with
    PyTorch at batch 1, 7 and 256 and the file is refused if it exceeds PARITY_TOLERANCE.
    """
    import onnx
    import onnxruntime as ort

    ensemble = ensemble.eval()
    head = ExportHead(ensemble).eval()
    shape = [int(s) for s in input_shape]
    model = _to_onnx(head, torch.rand(2, *shape))
    onnx.checker.check_model(model, full_check=True)
    # Metadata does not change what the graph computes: this session is the file's.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    threshold = calibrate_mutual_info(session, x_val, MI_FALSE_POSITIVE_RATE)
    metadata = {
        "orbit.format": FORMAT,
        "orbit.class_names": json.dumps(list(class_names)),
        "orbit.input_shape": json.dumps(shape),
        "orbit.value_range": "[0, 1]",
        "orbit.method": ensemble.method,
        "orbit.members": str(ensemble.num_members),
        "orbit.eps": repr(float(eps)) if eps is not None else "null",
        "orbit.version": __version__,
        "orbit.weights_sha256": weights_sha256(model),
        "orbit.mutual_info_threshold": repr(threshold),
        "orbit.mutual_info_fpr": repr(MI_FALSE_POSITIVE_RATE),
        "orbit.calibration_samples": str(len(x_val)),
        **(extra_metadata or {}),
    }
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "orbit", __version__
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    gaps = parity(session, ensemble, x_check)
    worst = max(gaps.values())
    if not worst <= PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX and PyTorch disagree: max |probs diff| {worst:.2e} ({gaps})")
    atomic.write_bytes(path, data)
    return ExportResult(Path(path), metadata, gaps)


def export_pair(
    base: LoadedModel,
    loaded: LoadedEnsemble,
    splits: DatasetSplits,
    model_path: str | Path,
    base_path: str | Path,
) -> tuple[ExportResult, ExportResult]:
    """The ensemble as model_path and its base model (an ensemble of one) as base_path."""
    common = {
        "class_names": list(splits.class_names),
        "input_shape": list(base.model.spec.input_shape),
        "x_val": splits.val.x,
        "x_check": splits.test.x,
    }
    info = loaded.info
    extra = {
        "orbit.dataset": str(info.get("dataset")),
        "orbit.base_weights_sha256": base.weights_sha256,
    }
    for key in ("anchors", "algebra", "seed"):
        if info.get(key) is not None:
            extra[f"orbit.{key}"] = str(info[key])
    model = export_onnx(
        loaded.ensemble, model_path, eps=info.get("eps"), extra_metadata=extra, **common
    )
    single = export_onnx(
        SingleModel(base.model),
        base_path,
        eps=None,
        extra_metadata={k: extra[k] for k in ("orbit.dataset", "orbit.base_weights_sha256")},
        **common,
    )
    return model, single


# --- deployment descriptions -------------------------------------------------------------------

_TRITON_TYPES = {"probs": "TYPE_FP32", "label": "TYPE_INT64", "agreement": "TYPE_FP32",
                 "mutual_info": "TYPE_FP32"}  # fmt: skip


def triton_config(name: str, input_shape: list[int], num_classes: int, max_batch_size: int) -> str:
    """config.pbtxt for Triton's onnxruntime backend: batch-first tensors, dynamic batching.

    With max_batch_size > 0 Triton's dims leave the batch out; the per-input scalars
    (label, agreement, mutual_info: ONNX shape [batch]) are dims [1] reshaped to [].
    """
    dims = ", ".join(str(int(d)) for d in input_shape)
    outputs = []
    for out in OUTPUTS:
        if out == "probs":
            shape = f"dims: [ {int(num_classes)} ]"
        else:
            shape = "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        kind = _TRITON_TYPES[out]
        outputs.append(f'  {{\n    name: "{out}"\n    data_type: {kind}\n    {shape}\n  }}')
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT}"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}\n'
        "]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 500\n}\n"
    )


def write_triton_repository(
    onnx_path: str | Path,
    repository: str | Path,
    *,
    name: str,
    input_shape: list[int],
    num_classes: int,
    max_batch_size: int,
) -> Path:
    """REPOSITORY/NAME/{config.pbtxt, 1/model.onnx}; replaces only that model's folder."""
    check_name(name)
    if max_batch_size <= 0:
        raise UserError(f"--max-batch must be positive, got {max_batch_size}")
    target = Path(repository) / name
    with atomic.atomic_dir(target) as tmp:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(Path(onnx_path).read_bytes())
        (tmp / "config.pbtxt").write_text(
            triton_config(name, input_shape, num_classes, max_batch_size), encoding="utf-8"
        )
    return target


def check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?", name):
        raise UserError(
            f"model name {name!r} must be 1-42 lowercase letters, digits or '-', starting with a"
            " letter (a Kubernetes and Triton friendly name)"
        )


_CPU_LIMIT = 2  # the pod's CPU limit, and onnxruntime's thread count inside it


def kserve_manifest(
    *,
    service: str,
    model_name: str,
    image: str,
    storage_uri: str,
    max_batch: int,
    metadata: dict[str, str],
) -> str:
    """A KServe InferenceService running the orbit serving image (custom predictor container).

    KServe's storage initializer copies STORAGE_URI's content to /mnt/models, where the image's
    `orbit serve` finds model.onnx; it answers the Open Inference (V2) protocol on port 8080.
    """
    check_name(service)
    check_name(model_name)

    def q(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar

    args = ["/mnt/models/model.onnx", "--host", "0.0.0.0", "--port", "8080",
            "--name", model_name, "--max-batch", str(int(max_batch)),
            "--threads", str(_CPU_LIMIT)]  # fmt: skip
    lines = [
        "# KServe InferenceService for an orbit ensemble (written by `orbit export --kserve`).",
        "# Copy export/model.onnx to STORAGE_URI; apply with `kubectl apply -f THIS_FILE`.",
        "apiVersion: serving.kserve.io/v1beta1",
        "kind: InferenceService",
        "metadata:",
        f"  name: {service}",
        "  annotations:",
        f"    orbit/method: {q(metadata.get('orbit.method', ''))}",
        f"    orbit/members: {q(metadata.get('orbit.members', ''))}",
        f"    orbit/weights-sha256: {q(metadata.get('orbit.weights_sha256', ''))}",
        "spec:",
        "  predictor:",
        "    minReplicas: 1",
        "    containers:",
        "      - name: kserve-container",
        f"        image: {q(image)}",
        f"        args: [{', '.join(q(a) for a in args)}]",
        "        env:",
        "          - name: STORAGE_URI",
        f"            value: {q(storage_uri)}",
        "        ports:",
        "          - containerPort: 8080",
        "            protocol: TCP",
        "        readinessProbe:",
        "          httpGet:",
        "            path: /v2/health/ready",
        "            port: 8080",
        "        livenessProbe:",
        "          httpGet:",
        "            path: /v2/health/live",
        "            port: 8080",
        "        resources:",
        "          requests:",
        '            cpu: "1"',
        "            memory: 1Gi",
        "          limits:",
        '            cpu: "2"',
        "            memory: 2Gi",
    ]
    return "\n".join(lines) + "\n"
