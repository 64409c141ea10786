"""serve/ without a server: reading and refusing ONNX files, request checks, the KServe model."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import write_model

from orbit.errors import UserError
from serve import metadata
from serve.guard import RequestGuard
from serve.model import OrbitOnnxModel
from serve.server import ServeConfig, build, default_max_body_bytes
from serve.validation import RequestError, parse_envelope, pixels_from_request

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "model.onnx", threshold=1.0)


# --- ONNX files ------------------------------------------------------------------------------


def test_load_reads_contract_and_metadata(model_path):
    _, info = metadata.load(model_path)
    assert info.input_shape == SHAPE
    assert info.class_names == [f"class{i}" for i in range(10)]
    assert info.value_range == (0.0, 1.0)
    assert info.mutual_info_threshold == 1.0
    assert [t.as_v2() for t in info.inputs] == [
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    ]
    assert [(t.name, t.datatype, t.shape) for t in info.outputs] == [
        ("probs", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
        ("agreement", "FP32", [-1]),
        ("mutual_info", "FP32", [-1]),
        ("suspicious", "BOOL", [-1]),
    ]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: p.parent, "is a directory; give the ONNX file in it"),
        (lambda p: (p.write_bytes(b"\x08\x07garbage"), p)[1], "not a loadable ONNX file"),
        (lambda p: (p.write_bytes(b""), p)[1], "not a loadable ONNX file"),
        (lambda p: write_model(p, metadata={}), "not an orbit ONNX file"),
        (
            lambda p: write_model(p, metadata={"orbit.format": "orbit.onnx/9"}),
            "has format 'orbit.onnx/9'",
        ),
        (lambda p: write_model(p, input_name="x"), "one input 'pixels'"),
        (
            lambda p: write_model(
                p,
                metadata={
                    "orbit.format": "orbit.onnx/1",
                    "orbit.class_names": '["a", "b"]',
                    "orbit.input_shape": "[1, 8, 8]",
                    "orbit.mutual_info_threshold": "0.1",
                },
            ),
            "'probs' has 10 classes",
        ),
        (
            lambda p: write_model(
                p,
                metadata={
                    "orbit.format": "orbit.onnx/1",
                    "orbit.class_names": json.dumps([str(i) for i in range(10)]),
                    "orbit.input_shape": "[3, 8, 8]",
                    "orbit.mutual_info_threshold": "0.1",
                },
            ),
            "metadata says [batch, 3, 8, 8]",
        ),
        (
            lambda p: write_model(
                p,
                metadata={
                    "orbit.format": "orbit.onnx/1",
                    "orbit.class_names": json.dumps([str(i) for i in range(10)]),
                    "orbit.input_shape": "[1, 8, 8]",
                    "orbit.mutual_info_threshold": "nan",
                },
            ),
            "mutual_info_threshold",
        ),
    ],
)
def test_unusable_files_are_one_line_user_errors(tmp_path, make, fragment):
    path = make(tmp_path / "model.onnx")
    with pytest.raises(UserError) as e:
        metadata.load(path)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


# --- request envelope ------------------------------------------------------------------------

GOOD = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5]}]}


def test_json_envelope_accepts_a_v2_request():
    parse_envelope(json.dumps(GOOD).encode(), "application/json", None)
    parse_envelope(json.dumps(GOOD).encode(), "application/cloudevents+json; charset=utf-8", None)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"inputs": [{"data": [NaN]}]}', "contains NaN"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": []}', "non-empty 'inputs'"),
        (b'{"inputs": [1]}', "inputs[0] must be an object"),
        (b'{"inputs": [{"name": "pixels"}]}', "lacks 'shape'"),
        (b'{"inputs": [{"name": 3, "shape": [1], "datatype": "FP32", "data": []}]}', "'name'"),
        (b'{"inputs": [{"name": "p", "shape": [-1], "datatype": "FP32", "data": []}]}', "shape"),
        (b'{"inputs": [{"name": "p", "shape": [1], "datatype": "FP32", "data": 1}]}', "'data'"),
        (b'{"inputs": [{"name": "p", "shape": [1], "datatype": "FP32"}]}', "lacks 'data'"),
        (b'{"inputs": [], "instances": [1]}', "unknown request field"),
        (json.dumps({**GOOD, "outputs": [{"nom": 1}]}).encode(), "outputs[0]"),
        (json.dumps({**GOOD, "parameters": {"a": [1]}}).encode(), "parameter 'a'"),
        (json.dumps({**GOOD, "id": 5}).encode(), "'id'"),
    ],
)
def test_json_envelope_refusals_name_the_problem(body, fragment):
    with pytest.raises(RequestError) as e:
        parse_envelope(body, "application/json", None)
    assert fragment in str(e.value)


def _binary(arr: np.ndarray, size: int | None = None, dtype: str = "FP32") -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": list(arr.shape),
                    "datatype": dtype,
                    "parameters": {"binary_data_size": arr.nbytes if size is None else size},
                }
            ]
        }
    ).encode()
    return header + arr.tobytes(), str(len(header))


def test_binary_envelope_sizes_must_add_up():
    x = np.zeros((2, 1, 8, 8), np.float32)
    body, n = _binary(x)
    parse_envelope(body, None, n)
    with pytest.raises(RequestError, match="needs 512"):
        parse_envelope(*_binary_args(x, size=100))
    with pytest.raises(RequestError, match="binary part of the body is 515 bytes"):
        parse_envelope(body + b"abc", None, n)
    with pytest.raises(RequestError, match="cannot be sent as binary"):
        parse_envelope(*_binary_args(x, dtype="BYTES"))
    for bad in ("abc", "0", str(len(body) + 1)):
        with pytest.raises(RequestError, match="inference-header-content-length"):
            parse_envelope(body, None, bad)
    with pytest.raises(RequestError, match="Content-Type: application/json"):
        parse_envelope(body, "text/plain", None)


def _binary_args(arr, **kw):
    body, n = _binary(arr, **kw)
    return body, None, n


# --- the tensor --------------------------------------------------------------------------------


def _pixels(name="pixels", dtype="FP32", shape=(1, 1, 8, 8), data=None, max_batch=4):
    if data is None:
        data = [0.25] * int(np.prod(shape)) if all(d >= 0 for d in shape) else []
    return pixels_from_request([(name, dtype, list(shape), data)], SHAPE, (0.0, 1.0), max_batch)


def test_pixels_accepts_flat_and_nested_data():
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    flat = _pixels(shape=x.shape, data=x.ravel().tolist())
    nested = _pixels(shape=x.shape, data=x.tolist())
    assert flat.dtype == np.float32 and flat.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(flat, x)
    np.testing.assert_array_equal(nested, x)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "image"}, "unknown input 'image'"),
        ({"dtype": "FP64"}, "datatype FP64; send FP32"),
        ({"dtype": "INT32"}, "send FP32"),
        ({"shape": (1, 64)}, "must be [batch, 1, 8, 8]"),
        ({"shape": (0, 1, 8, 8)}, "at least one image"),
        ({"shape": (5, 1, 8, 8)}, "exceeds the server's --max-batch 4"),
        ({"shape": (1, 3, 8, 8)}, "3 channel(s); this model takes 1"),
        ({"shape": (1, 1, 28, 28)}, "images of 28x28"),
        ({"data": [0.5] * 63}, "carries 63"),
        ({"data": [[0.5] * 8] * 8}, "nested as [8, 8]"),
        ({"data": [float("nan")] + [0.5] * 63}, "NaN or Inf"),
        ({"data": [float("-inf")] + [0.5] * 63}, "NaN or Inf"),
        ({"data": [1.5] + [0.5] * 63}, "outside [0, 1]"),
        ({"data": [-0.01] + [0.5] * 63}, "outside [0, 1]"),
        ({"data": ["0.5"] * 64}, "only numbers"),
        ({"data": [None] * 64}, "only numbers"),
        ({"data": [True] * 64}, "only numbers"),
        ({"data": [[0.5], [0.5, 0.5]]}, "list of numbers"),
    ],
)
def test_pixels_refusals_name_the_problem(kwargs, fragment):
    with pytest.raises(RequestError) as e:
        _pixels(**kwargs)
    assert fragment in str(e.value)


def test_pixels_refuses_missing_and_repeated_inputs():
    with pytest.raises(RequestError, match="missing input 'pixels'"):
        pixels_from_request([], SHAPE, (0.0, 1.0), 4)
    twice = [("pixels", "FP32", [1, 1, 8, 8], [0.5] * 64)] * 2
    with pytest.raises(RequestError, match="given 2 times"):
        pixels_from_request(twice, SHAPE, (0.0, 1.0), 4)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data", "x"]), children)
    ),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    obj=st.one_of(
        _json_values,
        st.fixed_dictionaries(
            {"inputs": st.lists(_json_values, max_size=2)},
            optional={"outputs": _json_values, "id": _json_values, "parameters": _json_values},
        ),
    ),
    header=st.one_of(st.none(), st.integers(-2, 400).map(str), st.text(max_size=4)),
    content_type=st.sampled_from([None, "application/json", "text/plain"]),
)
def test_envelope_and_pixels_only_ever_raise_request_error(obj, header, content_type):
    """Whatever the body, the checks either pass it or refuse it with a RequestError."""
    body = json.dumps(obj).encode()
    try:
        parse_envelope(body, content_type, header)
    except RequestError:
        return
    for item in obj["inputs"]:
        entry = (item["name"], item["datatype"], item["shape"], item.get("data"))
        try:
            x = pixels_from_request([entry], SHAPE, (0.0, 1.0), 4)
        except RequestError:
            continue
        assert x.dtype == np.float32 and x.shape[1:] == SHAPE and 1 <= x.shape[0] <= 4
        assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


# --- the KServe model --------------------------------------------------------------------------


def test_model_is_ready_only_after_load_and_answers_like_onnxruntime(model_path):
    from serve._kserve import InferInput, InferRequest

    model = OrbitOnnxModel("orbit", model_path, max_batch=8)
    model.start()  # kserve calls start(); it must not fake readiness
    assert not model.ready
    assert model.load() and model.ready
    x = np.random.default_rng(1).random((6, 1, 8, 8)).astype(np.float32)
    request = InferRequest(
        "orbit", [InferInput("pixels", list(x.shape), "FP32", data=x.ravel().tolist())]
    )
    response = model.infer(request)
    got = {o.name: o.data for o in response.outputs}
    ref = ort.InferenceSession(str(model_path)).run(None, {"pixels": x})
    np.testing.assert_allclose(got["probs"], ref[0], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got["label"], ref[1])
    np.testing.assert_allclose(got["agreement"], ref[2], rtol=0, atol=1e-7)
    np.testing.assert_allclose(got["mutual_info"], ref[3], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(got["suspicious"], ref[3] > 1.0)
    assert got["suspicious"].any() and not got["suspicious"].all()  # the fixture splits


def test_model_and_guard_survive_pickling_into_workers(model_path):
    model = OrbitOnnxModel("orbit", model_path, max_batch=8)
    model.load()
    clone = pickle.loads(pickle.dumps(model))  # what kserve does for --workers > 1
    assert clone.ready and clone.session is not model.session
    x = np.full((2, 1, 8, 8), 0.3, np.float32)
    np.testing.assert_array_equal(
        clone.predict_arrays(x)["probs"], model.predict_arrays(x)["probs"]
    )
    guard = pickle.loads(pickle.dumps(RequestGuard(4096)))
    assert guard.max_body_bytes == 4096 and guard._app is None


def test_a_body_that_stalls_gets_408_and_the_app_never_sees_it():
    import asyncio

    reached = []

    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        reached.append(scope["path"])

    async def stalls():  # noqa: ANN202
        if not stalls.sent:
            stalls.sent = True
            return {"type": "http.request", "body": b'{"inputs": [', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    stalls.sent = False
    sent = []

    async def send(message):  # noqa: ANN001, ANN202
        sent.append(message)

    guard = RequestGuard(4096, body_idle_seconds=0.2)
    guard._app = app
    scope = {"type": "http", "path": "/v2/models/orbit/infer", "method": "POST", "headers": []}
    asyncio.run(asyncio.wait_for(guard(scope, stalls, send), 10))
    assert sent[0]["status"] == 408 and b"stalled" in sent[1]["body"]
    assert reached == []


def test_build_refuses_bad_flags_and_busy_ports(model_path):
    import socket

    for kwargs, fragment in [
        ({"port": 0}, "--port"),
        ({"workers": 0}, "--workers"),
        ({"max_batch": 0}, "--max-batch"),
        ({"name": "a/b"}, "--name"),
        ({"max_body_bytes": 10}, "--max-body-bytes"),
        ({"intra_op_threads": -1}, "--threads"),
    ]:
        with pytest.raises(UserError, match=fragment):
            build(ServeConfig(model=model_path, **kwargs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            build(ServeConfig(model=model_path, port=s.getsockname()[1]))


def test_default_body_limit_fits_a_full_batch_as_json():
    """A JSON body grows linearly with the batch: measure 16 images, scale to --max-batch 256."""
    x = np.random.default_rng(0).random((16, 3, 32, 32)).astype(np.float32)
    x.ravel()[::7] = np.float32(1.1754944e-38)  # long decimal expansions, the worst case
    data = x.tolist()
    body = json.dumps(
        {"inputs": [{"name": "pixels", "shape": [16, 3, 32, 32], "datatype": "FP32", "data": data}]}
    ).encode()
    assert len(body) * 256 // 16 < default_max_body_bytes(256, (3, 32, 32))


def test_binary_decoder_agrees_with_kserves():
    """serve.modelserver's decoder gives what kserve's gives, as arrays instead of lists."""
    from serve._kserve import InferRequest
    from serve.modelserver import decode_binary_request

    x = np.random.default_rng(3).random((4, 1, 8, 8)).astype(np.float32)
    header = json.dumps(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {
                    "name": "pixels",
                    "shape": [4, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                },
                {"name": "extra", "shape": [2], "datatype": "INT64", "data": [1, 2]},
            ],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}, {"name": "label"}],
        }
    ).encode()
    body = header + x.tobytes()
    theirs = InferRequest.from_bytes(body, len(header), "orbit")
    ours = decode_binary_request(body, len(header), "orbit")
    assert (ours.id, ours.parameters, ours.model_name) == (theirs.id, theirs.parameters, "orbit")
    assert ours.use_binary_outputs == theirs.use_binary_outputs is True
    assert [(o.name, o.parameters) for o in ours.request_outputs] == [
        (o.name, o.parameters) for o in theirs.request_outputs
    ]
    for mine, ref in zip(ours.inputs, theirs.inputs, strict=True):
        assert (mine.name, mine.datatype, list(mine.shape)) == (ref.name, ref.datatype, ref.shape)
        np.testing.assert_array_equal(np.asarray(mine.data).ravel(), np.asarray(ref.data).ravel())
    assert isinstance(ours.inputs[0].data, np.ndarray) and ours.inputs[0].data.dtype == np.float32
