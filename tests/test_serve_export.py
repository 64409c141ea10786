"""`orbit serve` on what the exporter really writes: a symmetry ensemble of a digits model,
exported by ensemble.export, answers tritonclient exactly as onnxruntime and PyTorch do."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as triton
from onnx_fixtures import running_server

from ensemble.export import SingleModel, export_onnx
from ensemble.symmetry import build_symmetry
from training.datasets import load_dataset
from training.models import ModelSpec, build_model

pytestmark = pytest.mark.slow
OUTPUTS = ["probs", "label", "agreement", "mutual_info", "suspicious"]


def _digits_model(splits) -> torch.nn.Module:
    """A small digits MLP after a second of plain Adam (about 0.97 test accuracy)."""
    torch.manual_seed(0)
    x, y = splits.train.x, splits.train.y
    spec = ModelSpec(
        arch="mlp",
        input_shape=tuple(x.shape[1:]),
        num_classes=len(splits.class_names),
        hidden=32,
        mean=[float(x.mean())],
        std=[float(x.std())],
    )
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # One thread: tiny matmuls on 2 busy cores run ~10x slower with two (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _export(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _export(tmp_path_factory):
    splits = load_dataset("digits", None)
    base = _digits_model(splits)
    build = build_symmetry(base, splits.train.x, splits.train.y, members=8, eps=0.5, anchors=16)
    out = tmp_path_factory.mktemp("export")
    common = {
        "class_names": list(splits.class_names),
        "input_shape": list(base.spec.input_shape),
        "x_val": splits.val.x,
        "x_check": splits.test.x,
    }
    model = export_onnx(build.ensemble, out / "model.onnx", eps=0.5, **common)
    single = export_onnx(SingleModel(base), out / "base.onnx", eps=None, **common)
    return splits, build.ensemble, model, single


def _infer(url: str, x: np.ndarray) -> dict[str, np.ndarray]:
    client = triton.InferenceServerClient(url)
    try:
        inp = triton.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(
            "orbit", [inp], outputs=[triton.InferRequestedOutput(n) for n in OUTPUTS]
        )
        return {n: result.as_numpy(n) for n in OUTPUTS}
    finally:
        client.close()


def test_served_ensemble_matches_onnxruntime_and_pytorch(exported, tmp_path):
    splits, ensemble, model, _ = exported
    x = splits.test.x[:256].numpy()
    threshold = float(model.metadata["orbit.mutual_info_threshold"])
    with running_server(model.path, tmp_path) as server:
        client = triton.InferenceServerClient(server.url)
        meta = client.get_model_metadata("orbit")
        client.close()
        parts = [_infer(server.url, x[i : i + 64]) for i in range(0, len(x), 64)]
    got = {n: np.concatenate([p[n] for p in parts]) for n in OUTPUTS}
    c, h, w = splits.input_shape
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, c, h, w]}]
    direct = ort.InferenceSession(str(model.path)).run(None, {"pixels": x})
    np.testing.assert_array_equal(got["probs"], direct[0])
    np.testing.assert_array_equal(got["label"], direct[1])
    np.testing.assert_array_equal(got["agreement"], direct[2])
    np.testing.assert_array_equal(got["mutual_info"], direct[3])
    np.testing.assert_array_equal(got["suspicious"], direct[3] > threshold)
    with torch.no_grad():
        ref = ensemble.predict(torch.from_numpy(x))
    np.testing.assert_allclose(got["probs"], ref.probs.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["agreement"], ref.agreement.numpy(), rtol=0, atol=1e-6)
    top2 = np.sort(ref.probs.numpy(), axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # labels can only differ at near-ties
    np.testing.assert_array_equal(got["label"][clear], ref.label.numpy()[clear])
    assert (got["label"] == splits.test.y[:256].numpy()).mean() > 0.8  # a working classifier
    # the calibrated threshold flags some inputs (5% of clean validation data lie above it)
    assert 0 < got["suspicious"].mean() < 0.5


def test_served_base_model_has_full_agreement_and_no_mutual_info(exported, tmp_path):
    splits, _, _, single = exported
    x = splits.test.x[:32].numpy()
    with running_server(single.path, tmp_path) as server:
        got = _infer(server.url, x)
    np.testing.assert_array_equal(got["agreement"], np.ones(32, np.float32))
    np.testing.assert_array_equal(got["mutual_info"], np.zeros(32, np.float32))
    assert not got["suspicious"].any()
