"""A live `orbit serve` on a free loopback port, driven by tritonclient and by raw HTTP: correct
answers, every malformed request refused with a 4xx naming the problem (by hand and fuzzed), the
server still answering afterwards, 2,000 concurrent requests, start-up failures, no torch."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import REPO, free_port, running_server, write_model
from onnx_fixtures import _metadata as _fixture_metadata

pytestmark = pytest.mark.slow

MAX_BATCH = 64
MAX_BODY = 256 * 1024
THRESHOLD = 1.0
OUTPUTS = ["probs", "label", "agreement", "mutual_info", "suspicious"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx", threshold=THRESHOLD)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    flags = ("--max-batch", str(MAX_BATCH), "--max-body-bytes", str(MAX_BODY))
    with running_server(model_path, tmp_path_factory.mktemp("log"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def reference(model_path):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        probs, label, agreement, mi = session.run(None, {"pixels": x})
        return {
            "probs": probs,
            "label": label,
            "agreement": agreement,
            "mutual_info": mi,
            "suspicious": mi > THRESHOLD,
        }

    return run


def _assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        assert got[name].shape == want[name].shape, name
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _triton_infer(client, x: np.ndarray, binary: bool = True) -> dict[str, np.ndarray]:
    inp = triton.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    result = client.infer("orbit", [inp], outputs=outs)
    return {n: result.as_numpy(n) for n in OUTPUTS}


def _check_still_right(server, reference, seed: int) -> None:
    x = np.random.default_rng(seed).random((3, 1, 8, 8), dtype=np.float32)
    client = triton.InferenceServerClient(server.url)
    try:
        _assert_matches(_triton_infer(client, x), reference(x))
    finally:
        client.close()
    assert server.process.poll() is None


def _post(server, body: bytes, headers: dict[str, str], path: str = "/v2/models/orbit/infer"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- tritonclient: health, metadata, infer ----------------------------------------------------


def test_tritonclient_health_metadata_and_infer_match_onnxruntime(server, reference):
    client = triton.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("orbit")
        assert not client.is_model_ready("other")
        meta = client.get_model_metadata("orbit")
        assert meta["name"] == "orbit" and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("probs", "FP32", [-1, 10]),
            ("label", "INT64", [-1]),
            ("agreement", "FP32", [-1]),
            ("mutual_info", "FP32", [-1]),
            ("suspicious", "BOOL", [-1]),
        ]
        rng = np.random.default_rng(0)
        seen_suspicious = set()
        for batch, binary in [(1, True), (7, False), (32, True), (MAX_BATCH, False)]:
            x = rng.random((batch, 1, 8, 8), dtype=np.float32)
            got = _triton_infer(client, x, binary=binary)
            _assert_matches(got, reference(x))
            seen_suspicious.update(got["suspicious"].tolist())
        assert seen_suspicious == {True, False}  # the threshold from the metadata is applied
        # Without requested outputs every output comes back as JSON.
        x = rng.random((2, 1, 8, 8), dtype=np.float32)
        inp = triton.InferInput("pixels", [2, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("orbit", [inp])
        _assert_matches({n: result.as_numpy(n) for n in OUTPUTS}, reference(x))
    finally:
        client.close()


def _listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by process `pid` (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing: not a listening socket
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)
                ip = ".".join(str(b) for b in raw[::-1]) if len(raw) == 4 else addr
                found.add((ip, int(port, 16)))
    return found


def test_server_listens_on_loopback_only_and_never_loaded_torch(server):
    assert _listening_sockets(server.process.pid) == {("127.0.0.1", server.port)}  # no gRPC
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "onnxruntime" in maps
    assert "libtorch" not in maps


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter in the repository; it must exit 0."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


def test_serve_imports_without_torch_in_a_fresh_interpreter():
    # The serving image ships only orbit/ and serve/ (see .dockerignore) and no torch: make every
    # other package of ours, and torch, unimportable, as they are in the image.
    code = (
        "import sys\n"
        "for name in ('torch', 'ensemble', 'training', 'attacks', 'symmetry'):\n"
        "    sys.modules[name] = None\n"
        "import serve, serve.server, serve.model, serve.modelserver, serve.guard, serve.metadata\n"
        "import serve.validation\n"
        "sys.argv = ['orbit', 'serve', '--help']\n"
        "from orbit import cli\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('TORCH-LOADED' if sys.modules.get('torch') is not None else 'NO-TORCH')\n"
    )
    out = _fresh_python(code)
    assert "--max-batch" in out.stdout  # the help text was printed
    assert out.stdout.strip().endswith("NO-TORCH")


def test_serve_does_not_load_torch_even_where_torch_is_installed():
    # Nothing blocked this time: torch is installed in this environment, and neither serve/ nor
    # anything it imports (kserve, onnxruntime, fastapi) may pull it in on the side.
    code = (
        "import sys\n"
        "import serve, serve.server, serve.model, serve.modelserver, serve.guard, serve.metadata\n"
        "import serve.validation, orbit.cli, orbit.commands.serve\n"
        "ours = ('torch', 'ensemble', 'training', 'attacks')\n"
        "print(sorted(m for m in ours if m in sys.modules))\n"
    )
    out = _fresh_python(code)
    assert importlib.util.find_spec("torch") is not None  # so the check below means something
    assert out.stdout.strip() == "[]"


# --- malformed requests, by hand ---------------------------------------------------------------


def _json_request(name="pixels", datatype="FP32", shape=(1, 1, 8, 8), data=None, **extra):
    if data is None:
        data = [0.5] * int(np.prod(shape))
    body = {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}
    return json.dumps({**body, **extra}).encode()


def _binary_request(arr: np.ndarray, datatype="FP32", declared: int | None = None):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": list(arr.shape),
                    "datatype": datatype,
                    "parameters": {
                        "binary_data_size": arr.nbytes if declared is None else declared
                    },
                }
            ]
        }
    ).encode()
    return header + arr.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _binary_empty_request(shape: list[int]):
    """A binary request with no values but absurd dimensions (numpy cannot lay it out)."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    ).encode()
    return head, {"Inference-Header-Content-Length": str(len(head))}


JSON = {"Content-Type": "application/json"}
_half = np.full((1, 1, 8, 8), 0.5, np.float32)
_nan = _half.copy()
_nan[0, 0, 3, 3] = np.nan
_inf = _half.copy()
_inf[0, 0, 0, 0] = np.inf

BARRAGE = [
    # (what, body, headers, status, fragment of the error message)
    ("no inputs", b'{"inputs": []}', JSON, 400, "non-empty 'inputs'"),
    ("no inputs key", b'{"id": "1"}', JSON, 400, "non-empty 'inputs'"),
    ("unknown input name", _json_request(name="image"), JSON, 400, "unknown input 'image'"),
    (
        "input twice",
        b'{"inputs": [%s, %s]}' % ((_json_request()[12:-2],) * 2),
        JSON,
        400,
        "2 times",
    ),
    ("datatype FP64", _json_request(datatype="FP64"), JSON, 400, "datatype FP64; send FP32"),
    ("datatype BYTES", _json_request(datatype="BYTES"), JSON, 400, "send FP32"),
    ("rank 2", _json_request(shape=(1, 64)), JSON, 400, "must be [batch, 1, 8, 8]"),
    ("3 channels", _json_request(shape=(1, 3, 8, 8)), JSON, 400, "3 channel(s)"),
    ("28x28 images", _json_request(shape=(1, 1, 28, 28)), JSON, 400, "images of 28x28"),
    ("too few values", _json_request(data=[0.5] * 10), JSON, 400, "carries 10"),
    ("NaN literal", _json_request()[:-7] + b"NaN]}]}", JSON, 400, "contains NaN"),
    ("NaN binary", *_binary_request(_nan), 400, "NaN or Inf"),
    ("Inf binary", *_binary_request(_inf), 400, "NaN or Inf"),
    ("above 1", _json_request(data=[1.5] * 64), JSON, 400, "outside [0, 1]"),
    ("below 0", _json_request(data=[-0.25] + [0.5] * 63), JSON, 400, "outside [0, 1]"),
    ("strings", _json_request(data=["0.5"] * 64), JSON, 400, "only numbers"),
    ("batch 0", _json_request(shape=(0, 1, 8, 8)), JSON, 400, "at least one image"),
    ("batch > max", _json_request(shape=(MAX_BATCH + 1, 1, 8, 8)), JSON, 400, "--max-batch 64"),
    ("not JSON", b"\x00\x01binary junk", JSON, 400, "not valid JSON"),
    ("truncated JSON", _json_request()[:-7], JSON, 400, "not valid JSON"),
    ("empty body", b"", JSON, 400, "empty"),
    ("JSON list", b"[1, 2, 3]", JSON, 400, "JSON object"),
    ("unknown field", b'{"instances": [[0.5]]}', JSON, 400, "unknown request field"),
    ("text/plain", _json_request(), {"Content-Type": "text/plain"}, 400, "application/json"),
    ("too large", b"[" + b"0.5," * (MAX_BODY // 4) + b"0]", JSON, 413, "limit of 262144"),
    ("binary size lie", *_binary_request(_half, declared=12), 400, "needs 256"),
    ("binary absurd shape", *_binary_empty_request([2**40, 2**40, 0, 8]), 400, "absurdly large"),
    ("binary FP64", *_binary_request(_half.astype(np.float64), "FP64"), 400, "send FP32"),
    (
        "bad header length",
        _binary_request(_half)[0],
        {"Inference-Header-Content-Length": "x"},
        400,
        "inference-header-content-length",
    ),
    (
        "unknown output",
        _json_request(outputs=[{"name": "logits"}]),
        JSON,
        400,
        "unknown output 'logits'",
    ),
]


@pytest.mark.parametrize(
    ("what", "body", "headers", "status", "fragment"), BARRAGE, ids=[b[0] for b in BARRAGE]
)
def test_malformed_request_gets_4xx_naming_it_and_the_next_valid_one_is_right(
    server, reference, what, body, headers, status, fragment
):
    got_status, got_body = _post(server, body, headers)
    assert got_status == status, got_body
    message = json.loads(got_body)["error"]
    assert fragment in message
    _check_still_right(server, reference, seed=len(what))


def test_wrong_model_method_and_repository_calls_are_4xx(server, reference):
    assert _post(server, _json_request(), JSON, "/v2/models/other/infer")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v2/models/orbit/infer")
    assert conn.getresponse().status == 405
    conn.close()
    status, body = _post(server, b"", JSON, "/v2/repository/models/orbit/unload")
    assert status == 403 and "one fixed model" in json.loads(body)["error"]
    status, body = _post(server, _json_request(), JSON, "/v2/models/orbit/versions/1/infer")
    assert status == 404 and "no versions" in json.loads(body)["error"]
    status, body = _post(server, b"{}", JSON, "/v1/models/orbit:explain")
    assert status == 404 and "no explainer" in json.loads(body)["error"]
    _check_still_right(server, reference, seed=99)


def test_server_metadata_lists_only_what_it_offers_and_refusals_log_one_line(server, reference):
    client = triton.InferenceServerClient(server.url)
    try:
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    finally:
        client.close()
    before = server.log_text()
    for body in (_json_request(data=[1.5] * 64), _json_request(datatype="FP64")):
        assert _post(server, body, JSON)[0] == 400
    _check_still_right(server, reference, seed=98)
    logged = server.log_text()[len(before) :]
    assert logged.count("refused a request:") == 2, logged
    assert "Traceback" not in logged
    _check_still_right(server, reference, seed=99)


# --- malformed requests, fuzzed ----------------------------------------------------------------

_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_values = st.one_of(
    st.lists(st.floats(0, 1, width=32), min_size=64, max_size=64),
    st.lists(st.floats(width=32), min_size=64, max_size=64),
    st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=130),
    st.lists(_junk, max_size=8),
)


@st.composite
def _requests(draw):
    """(body, headers, pixels or None): near-valid V2 requests with one or more faults, or junk.
    `pixels` is set only when the request is valid, to check the answer against onnxruntime."""
    kind = draw(st.sampled_from(["json", "binary", "junk-json", "junk-bytes"]))
    if kind == "junk-bytes":
        return draw(st.binary(max_size=300)), draw(st.sampled_from([JSON, {}])), None
    if kind == "junk-json":
        return json.dumps(draw(_junk)).encode(), JSON, None
    name = draw(st.sampled_from(["pixels", "pixels", "pixel", "", "PIXELS"]))
    datatype = draw(st.sampled_from(["FP32", "FP32", "fp32", "FP64", "INT32", "BOOL", "FP16"]))
    batch = draw(st.integers(0, MAX_BATCH + 2))
    shape = draw(
        st.one_of(
            st.just([batch, 1, 8, 8]),
            st.lists(st.integers(0, 9), max_size=5),
        )
    )
    values = draw(st.one_of(_values, st.just(None)))
    if values is None:  # the right number of valid pixels for the (maybe faulty) shape
        n = min(int(np.prod(shape)) if shape else 0, 10_000)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        values = rng.random(n, dtype=np.float32).tolist()
    numeric = all(isinstance(v, float) for v in values)
    if kind == "binary":
        if not numeric:
            body = _binary_request(np.zeros(3, np.float32))[0][:-1]
            return body, {"Inference-Header-Content-Length": "9"}, None
        arr = np.asarray(values, dtype=np.float32)
        params = {"binary_data_size": arr.nbytes}
        head = json.dumps(
            {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "parameters": params}]}
        ).encode()
        body, headers = head + arr.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    else:
        body = json.dumps(
            {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": values}]}
        ).encode()
        headers = draw(st.sampled_from([JSON, {}]))  # tritonclient sends JSON without a type
    x = np.asarray(values, dtype=np.float32) if numeric else None
    valid = (
        name == "pixels"
        and datatype.upper() == "FP32"
        and len(shape) == 4
        and shape[1:] == [1, 8, 8]
        and 1 <= shape[0] <= MAX_BATCH
        and x is not None
        and x.size == int(np.prod(shape))
        and bool(np.isfinite(x).all())
        and (x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0))
    )
    return body, headers, (x.reshape(shape) if valid else None)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=_requests())
def test_fuzzed_requests_are_answered_right_or_refused_with_4xx(server, reference, request):
    body, headers, pixels = request
    status, answer = _post(server, body, headers)
    if pixels is None:
        assert 400 <= status < 500, (status, answer)
        assert json.loads(answer)["error"]
    else:
        assert status == 200, answer
        outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
        got = {n: np.asarray(outputs[n]["data"]).reshape(outputs[n]["shape"]) for n in OUTPUTS}
        want = reference(pixels)
        got["label"] = got["label"].astype(np.int64)
        _assert_matches(got, want)
    _check_still_right(server, reference, seed=len(body))


# --- load ---------------------------------------------------------------------------------------


def test_2000_requests_from_8_concurrent_clients_all_answered_right(server, reference):
    clients, per_client = 8, 250
    failures: list[str] = []
    answered = [0] * clients

    def work(k: int) -> None:
        rng = np.random.default_rng(1000 + k)
        client = triton.InferenceServerClient(server.url, network_timeout=60)
        try:
            for i in range(per_client):
                x = rng.random((1 + (i % 8), 1, 8, 8), dtype=np.float32)
                try:
                    _assert_matches(_triton_infer(client, x, binary=bool(i % 2)), reference(x))
                    answered[k] += 1
                except Exception as e:  # recorded, so one failure does not hide the others
                    failures.append(f"client {k} request {i}: {type(e).__name__}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sum(answered) == clients * per_client
    assert server.process.poll() is None
    _check_still_right(server, reference, seed=2000)


# --- start-up failures --------------------------------------------------------------------------


def test_unusable_model_files_and_busy_ports_exit_2_with_one_line(tmp_path, model_path, server):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not protobuf")
    foreign = write_model(tmp_path / "foreign.onnx", metadata={"producer": "someone else"})
    fixed = write_model(tmp_path / "fixed.onnx", input_dims=[1, 1, 8, 8])
    # Metadata promises 4x4 images to a graph whose shapes are left open but that needs 8x8:
    # every check of the declared shapes passes, and only running it shows it cannot work.
    wrong = write_model(
        tmp_path / "wrong.onnx",
        metadata={**_fixture_metadata(1, 4, 4, 10, 4, 0.05)},
        input_dims=["batch", "c", "h", "w"],
    )
    cases = [
        ([str(tmp_path / "missing.onnx")], "does not exist"),
        ([str(corrupt)], "not a loadable ONNX file"),
        ([str(foreign)], "not an orbit ONNX file"),
        ([str(fixed)], "has a fixed batch size 1"),
        ([str(wrong)], "the graph fails on a warm-up batch of 1"),
        (
            [str(model_path), "--port", str(server.port)],
            f"cannot listen on 127.0.0.1:{server.port}",
        ),
        ([str(model_path), "--host", "no-such-host.invalid"], "cannot be resolved"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orbit.cli", "serve", *args]
            + ([] if "--port" in args else ["--port", str(free_port())]),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    for proc, (_, fragment) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("orbit: error: "), err
        assert fragment in lines[0]


# --- several worker processes ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _model_workers(pid: int) -> list[int]:
    found = []
    for kid in _children(pid):
        try:
            if "onnxruntime" in Path(f"/proc/{kid}/maps").read_text():
                found.append(kid)
        except OSError:  # the process ended meanwhile
            continue
    return found


def test_two_workers_each_load_the_model_and_guard_requests(model_path, reference, tmp_path):
    with running_server(model_path, tmp_path, "--workers", "2") as live:
        # Ready means at least one worker answers (only serving workers accept connections);
        # wait until both have loaded the model, as kserve's supervisor brings them up.
        deadline = time.monotonic() + 90
        while len(_model_workers(live.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_model_workers(live.process.pid)) == 2
        rng = np.random.default_rng(7)
        for i in range(40):  # a new connection each time, so both processes take requests
            x = rng.random((1 + i % 4, 1, 8, 8), dtype=np.float32)
            status, body = _post(live, _json_request(shape=x.shape, data=x.ravel().tolist()), JSON)
            assert status == 200, body
            outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
            got = {n: np.asarray(outputs[n]["data"]).reshape(outputs[n]["shape"]) for n in OUTPUTS}
            _assert_matches(got, reference(x))
            status, body = _post(live, b"{", JSON)  # the guard runs in the workers too
            assert status == 400 and "not valid JSON" in json.loads(body)["error"]
        assert _listening_sockets(live.process.pid) == {("127.0.0.1", live.port)}
