"""Open an exported orbit ONNX file and check it against the export contract before serving it.

Everything a request is validated against (input shape, value range, class names, the calibrated
mutual-information threshold) comes from the file's own metadata, so the server needs no other
configuration. Any problem with the file is a UserError: one line at start-up, exit code 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from orbit.errors import UserError

FORMAT = "orbit.onnx/1"
INPUT = "pixels"
# Output name -> V2 datatype, in the order the contract lists them.
OUTPUTS: dict[str, str] = {
    "probs": "FP32",
    "label": "INT64",
    "agreement": "FP32",
    "mutual_info": "FP32",
}
SUSPICIOUS = "suspicious"  # computed by the server: mutual_info above the calibrated threshold

_ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(string)": "BYTES",
}
_EXPORT_HINT = "export one with `orbit export --run runs/NAME`"


@dataclass(frozen=True)
class TensorSpec:
    """One V2 metadata tensor: dynamic dimensions are -1."""

    name: str
    datatype: str
    shape: list[int]

    def as_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class OrbitModelInfo:
    """What the server knows about the model, all read from the ONNX file."""

    path: Path
    input_shape: tuple[int, int, int]  # C, H, W
    class_names: list[str]
    value_range: tuple[float, float]
    mutual_info_threshold: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]  # the contract outputs, then `suspicious`
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _v2_dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _json(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise UserError(f"{path}: orbit metadata lacks '{key}'; re-export it ({_EXPORT_HINT})")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: metadata '{key}' is not valid JSON ({e}); re-export it") from e


def _parse_metadata(meta: dict[str, str], path: Path) -> tuple[Any, ...]:
    names = _json(meta, "orbit.class_names", path)
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"{path}: metadata 'orbit.class_names' must be a non-empty list of strings")
    shape = _json(meta, "orbit.input_shape", path)
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise UserError(f"{path}: metadata 'orbit.input_shape' must be [C, H, W] positive ints")
    vr = _json(meta, "orbit.value_range", path) if "orbit.value_range" in meta else [0, 1]
    if not (
        isinstance(vr, list)
        and len(vr) == 2
        and all(isinstance(v, int | float) and math.isfinite(v) for v in vr)
        and vr[0] < vr[1]
    ):
        raise UserError(f"{path}: metadata 'orbit.value_range' must be [low, high] with low < high")
    raw = meta.get("orbit.mutual_info_threshold")
    try:
        threshold = float(raw) if raw is not None else math.nan
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise UserError(
            f"{path}: metadata 'orbit.mutual_info_threshold' is missing or not a finite number"
            f" ({raw!r}); re-export it ({_EXPORT_HINT})"
        )
    return names, tuple(shape), (float(vr[0]), float(vr[1])), threshold


def _check_graph(session: ort.InferenceSession, info_shape: tuple[int, ...], path: Path) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT:
        got = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        raise UserError(f"{path}: the graph must take one input '{INPUT}', it takes {got}")
    pix = inputs[0]
    dims = _v2_dims(list(pix.shape))
    if pix.type != "tensor(float)" or len(dims) != 4:
        raise UserError(f"{path}: input '{INPUT}' must be float32 [batch, C, H, W], got {pix.type}")
    if dims[0] != -1:
        raise UserError(
            f"{path}: input '{INPUT}' has a fixed batch size {dims[0]}; orbit serves graphs with"
            " a dynamic batch dimension (re-export it with `orbit export`)"
        )
    for got, want in zip(dims[1:], info_shape, strict=True):
        if got not in (-1, want):
            raise UserError(
                f"{path}: input '{INPUT}' has shape {pix.shape} but metadata says"
                f" [batch, {', '.join(map(str, info_shape))}]"
            )
    outs = {o.name: o for o in session.get_outputs()}
    for name, v2 in OUTPUTS.items():
        if name not in outs:
            raise UserError(f"{path}: the graph lacks the output '{name}'; re-export it")
        got = _ORT_TO_V2.get(outs[name].type, outs[name].type)
        if got != v2:
            raise UserError(f"{path}: output '{name}' is {got}, the contract says {v2}")
        rank = 2 if name == "probs" else 1
        if len(outs[name].shape) != rank:
            want = "[batch, classes]" if rank == 2 else "[batch]"
            raise UserError(
                f"{path}: output '{name}' has shape {outs[name].shape}, the contract says {want}"
            )


def load(
    path: str | Path, intra_op_threads: int = 0
) -> tuple[ort.InferenceSession, OrbitModelInfo]:
    """Open `path` with onnxruntime (CPU) and check it is an orbit export; UserError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the ONNX file in it; {_EXPORT_HINT}")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; {_EXPORT_HINT}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3  # errors only: a bad file is reported once, by us
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable ONNX file ({first}); {_EXPORT_HINT}") from e
    meta = dict(session.get_modelmeta().custom_metadata_map)
    fmt = meta.get("orbit.format")
    if fmt is None:
        raise UserError(
            f"{path} is not an orbit ONNX file (no 'orbit.format' metadata); {_EXPORT_HINT}"
        )
    if fmt != FORMAT:
        raise UserError(f"{path} has format '{fmt}'; this orbit serves '{FORMAT}'; re-export it")
    names, shape, vrange, threshold = _parse_metadata(meta, path)
    _check_graph(session, shape, path)
    probs = next(o for o in session.get_outputs() if o.name == "probs")
    width = _v2_dims(list(probs.shape))[-1] if len(probs.shape) == 2 else -1
    if width not in (-1, len(names)):
        raise UserError(
            f"{path}: 'probs' has {width} classes but 'orbit.class_names' lists {len(names)}"
        )
    by_name = {o.name: o for o in session.get_outputs()}
    # Only the contract's outputs are computed and returned; extra graph outputs are ignored.
    outputs = [TensorSpec(n, v2, _v2_dims(list(by_name[n].shape))) for n, v2 in OUTPUTS.items()]
    outputs.append(TensorSpec(SUSPICIOUS, "BOOL", [-1]))
    info = OrbitModelInfo(
        path=path,
        input_shape=shape,  # type: ignore[arg-type]
        class_names=names,
        value_range=vrange,
        mutual_info_threshold=threshold,
        inputs=[TensorSpec(INPUT, "FP32", [-1, *shape])],
        outputs=outputs,
        metadata=meta,
    )
    return session, info
