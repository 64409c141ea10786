"""Request checks: every malformed request becomes a RequestError whose message names the problem.

Two layers, both pure functions so they are tested without a server:
- the envelope (`parse_envelope`): the body is JSON (optionally followed by binary tensors, the
  Open Inference binary extension) shaped like a V2 inference request, with binary sizes that add
  up. It runs before kserve decodes the body, so kserve's decoder never meets a malformed one.
- the tensor (`pixels_from_request`): one FP32 input `pixels` [batch, C, H, W] of the model's
  shape, finite, inside the value range, with batch <= --max-batch.
"""

from __future__ import annotations

import contextlib
import json
import math
from email.message import Message
from typing import Any

import numpy as np
import orjson

INFERENCE_HEADER = "inference-header-content-length"

# Fixed-size V2 datatypes and their byte widths (the only ones a binary tensor may use here).
_ITEMSIZE = {
    "BOOL": 1,
    "INT8": 1,
    "UINT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "FP16": 2,
    "INT32": 4,
    "UINT32": 4,
    "FP32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP64": 8,
}
# numpy refuses shapes whose non-zero dimensions multiply past its index range, even for an empty
# tensor; no request this server accepts comes anywhere near this.
_MAX_ELEMENTS = 2**40
_TOP_KEYS = {"id", "parameters", "inputs", "outputs"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}


class RequestError(ValueError):
    """A malformed request; the server answers it with a 4xx status and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def is_json_content_type(content_type: str | None) -> bool:
    """True when FastAPI would parse the body as JSON (application/json or application/*+json)."""
    if not content_type:
        return False
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_maintype() != "application":
        return False
    sub = msg.get_content_subtype()
    return sub == "json" or sub.endswith("+json")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_parameters(params: Any, where: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise RequestError(f"{where} 'parameters' must be an object")
    for key, value in params.items():
        if not isinstance(value, bool | int | float | str):
            raise RequestError(f"{where} parameter '{key}' must be a number, boolean or string")


def _check_input(item: Any, index: int) -> None:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise RequestError(f"{where} must be an object with name, shape, datatype and data")
    unknown = set(item) - _INPUT_KEYS
    if unknown:
        raise RequestError(f"{where} has unknown field(s) {sorted(unknown)}")
    for key in ("name", "shape", "datatype"):
        if key not in item:
            raise RequestError(f"{where} lacks '{key}'")
    if not isinstance(item["name"], str):
        raise RequestError(f"{where} 'name' must be a string")
    if not isinstance(item["datatype"], str):
        raise RequestError(f"{where} 'datatype' must be a string such as \"FP32\"")
    shape = item["shape"]
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise RequestError(f"{where} 'shape' must be a list of non-negative integers")
    _check_parameters(item.get("parameters"), where)
    if "data" in item and not isinstance(item["data"], list):
        raise RequestError(f"{where} 'data' must be a list")


def check_envelope(obj: Any) -> None:
    """Raise RequestError unless `obj` (parsed JSON) has the structure of a V2 inference request."""
    if not isinstance(obj, dict):
        raise RequestError("the body must be a JSON object with an 'inputs' list")
    unknown = set(obj) - _TOP_KEYS
    if unknown:
        raise RequestError(
            f"unknown request field(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}"
        )
    if "id" in obj and obj["id"] is not None and not isinstance(obj["id"], str):
        raise RequestError("'id' must be a string")
    _check_parameters(obj.get("parameters"), "request")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("the request needs a non-empty 'inputs' list")
    for i, item in enumerate(inputs):
        _check_input(item, i)
    outputs = obj.get("outputs")
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list")
    for i, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"outputs[{i}] must be an object with a string 'name'")
        unknown = set(item) - _OUTPUT_KEYS
        if unknown:
            raise RequestError(f"outputs[{i}] has unknown field(s) {sorted(unknown)}")
        _check_parameters(item.get("parameters"), f"outputs[{i}]")


def _check_binary(obj: dict[str, Any], tail: int) -> None:
    """Inputs without 'data' must declare a binary_data_size that matches their shape, and the
    sizes must add up to the bytes after the JSON header."""
    total = 0
    for i, item in enumerate(obj["inputs"]):
        if "data" in item:
            continue
        params = item.get("parameters") or {}
        size = params.get("binary_data_size")
        if size is None:
            raise RequestError(f"inputs[{i}] has neither 'data' nor a 'binary_data_size' parameter")
        if not _is_int(size) or size < 0:
            raise RequestError(f"inputs[{i}] 'binary_data_size' must be a non-negative integer")
        dtype = item["datatype"].upper()
        if dtype not in _ITEMSIZE:
            raise RequestError(
                f"inputs[{i}] datatype '{item['datatype']}' cannot be sent as binary"
            )
        if math.prod(d for d in item["shape"] if d) > _MAX_ELEMENTS:
            raise RequestError(f"inputs[{i}] shape {item['shape']} is absurdly large")
        want = math.prod(item["shape"]) * _ITEMSIZE[dtype]
        if size != want:
            raise RequestError(
                f"inputs[{i}] 'binary_data_size' is {size} bytes but shape {item['shape']} of"
                f" {dtype} needs {want}"
            )
        total += size
    if total != tail:
        raise RequestError(
            f"the binary part of the body is {tail} bytes but the inputs declare {total}"
        )


def parse_envelope(body: bytes, content_type: str | None, header_length: str | None) -> None:
    """Check a raw infer body the way kserve will read it (JSON, or JSON + binary tensors)."""
    if is_json_content_type(content_type):
        json_part, tail = body, None
    else:
        if header_length is None:
            raise RequestError(
                "send the request as JSON with 'Content-Type: application/json' (or binary"
                f" tensors with the '{INFERENCE_HEADER}' header)"
            )
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise RequestError(
                f"'{INFERENCE_HEADER}' is {header_length!r}; it must be the byte length of the"
                f" JSON header, between 1 and the body's {len(body)} bytes"
            )
        json_part, tail = body[:n], len(body) - n
    if not json_part:
        raise RequestError("the request body is empty; send a V2 inference request as JSON")
    try:
        obj = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise RequestError(
            f"the request body is not valid JSON ({_json_problem(json_part, e)})"
        ) from e
    check_envelope(obj)
    if tail is not None:
        _check_binary(obj, tail)
        return
    for i, item in enumerate(obj["inputs"]):
        if "data" not in item:
            raise RequestError(f"inputs[{i}] lacks 'data' (a JSON request carries its tensors)")


def _json_problem(text: bytes, error: orjson.JSONDecodeError) -> str:
    """orjson's message, or a plain one when the cause is a NaN/Infinity literal."""
    found: list[str] = []

    def constant(name: str) -> float:
        found.append(name)
        return 0.0

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(text, parse_constant=constant)
    if found:
        return f"it contains {found[0]}; tensors must be finite numbers"
    return str(error)


def check_requested_outputs(requested: list[str], available: list[str]) -> None:
    for name in requested:
        if name not in available:
            raise RequestError(
                f"unknown output '{name}'; this model returns {', '.join(available)}"
            )


def pixels_from_request(
    inputs: list[tuple[str, str, list[int], Any]],
    input_shape: tuple[int, int, int],
    value_range: tuple[float, float],
    max_batch: int,
    input_name: str = "pixels",
) -> np.ndarray:
    """The checked float32 [batch, C, H, W] array from the request's (name, datatype, shape, data).

    `data` is the JSON 'data' list (flat or nested) or a numpy array.
    """
    names = [name for name, _, _, _ in inputs]
    unknown = [n for n in names if n != input_name]
    if unknown:
        raise RequestError(
            f"unknown input '{unknown[0]}'; this model takes one input '{input_name}'"
        )
    if not names:
        raise RequestError(f"missing input '{input_name}'")
    if len(names) > 1:
        raise RequestError(f"input '{input_name}' is given {len(names)} times; send it once")
    _, datatype, shape, data = inputs[0]
    if datatype.upper() != "FP32":
        raise RequestError(f"input '{input_name}' has datatype {datatype}; send FP32")
    c, h, w = input_shape
    want = f"[batch, {c}, {h}, {w}]"
    if len(shape) != 4:
        raise RequestError(f"input '{input_name}' has shape {list(shape)}; it must be {want}")
    batch = shape[0]
    if batch < 1:
        raise RequestError(f"input '{input_name}' has batch {batch}; send at least one image")
    if batch > max_batch:
        raise RequestError(
            f"batch {batch} exceeds the server's --max-batch {max_batch}; split the request"
        )
    if shape[1] != c:
        raise RequestError(
            f"input '{input_name}' has {shape[1]} channel(s); this model takes {c} ({want})"
        )
    if list(shape[2:]) != [h, w]:
        raise RequestError(
            f"input '{input_name}' has images of {shape[2]}x{shape[3]}; this model takes"
            f" {h}x{w} ({want})"
        )
    arr = _as_numbers(data, input_name)
    if arr.size != math.prod(shape):
        raise RequestError(
            f"input '{input_name}' declares shape {list(shape)} ({math.prod(shape)} values) but"
            f" carries {arr.size}"
        )
    if arr.ndim > 1 and list(arr.shape) != list(shape):
        raise RequestError(
            f"input '{input_name}' data is nested as {list(arr.shape)} but its shape says"
            f" {list(shape)}"
        )
    if not np.isfinite(arr).all():
        raise RequestError(f"input '{input_name}' contains NaN or Inf")
    lo, hi = value_range
    amin, amax = float(arr.min()), float(arr.max())
    if amin < lo or amax > hi:
        raise RequestError(
            f"input '{input_name}' has values in [{amin:.9g}, {amax:.9g}], outside"
            f" [{lo:g}, {hi:g}]; send raw pixels scaled to that range"
        )
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


def _as_numbers(data: Any, name: str) -> np.ndarray:
    """The data as a float array; strings, booleans, nulls and ragged lists are refused."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            arr = np.array(data)
        except (ValueError, TypeError, OverflowError) as e:
            raise RequestError(f"input '{name}' data must be a list of numbers ({e})") from e
    if arr.dtype.kind not in "iuf":
        raise RequestError(f"input '{name}' data must contain only numbers")
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)
