"""ONNX export: parity with PyTorch, the checker, the contract's metadata, base.onnx as an ensemble
of one, Triton and KServe descriptions, and `orbit export` on a real digits run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from google.protobuf import text_format

from ensemble.build import BuildRequest, build_ensemble
from ensemble.deep import DeepEnsemble
from ensemble.export import (
    FORMAT,
    INPUT,
    OUTPUTS,
    SingleModel,
    export_onnx,
    kserve_manifest,
    triton_config,
    weights_sha256,
    write_triton_repository,
)
from orbit import __version__, cli
from orbit.errors import UserError
from orbit.layout import RunLayout
from training.artifacts import LoadedModel, load_model
from training.config import TrainConfig
from training.datasets import DatasetSplits, load_dataset
from training.models import build_model
from training.train import train

CONTRACT_KEYS = {
    "orbit.format", "orbit.class_names", "orbit.input_shape", "orbit.value_range",
    "orbit.method", "orbit.members", "orbit.eps", "orbit.version", "orbit.weights_sha256",
    "orbit.mutual_info_threshold",
}  # fmt: skip


def _triton_model_config_pb2():
    """tritonclient's ModelConfig protobuf, loaded without tritonclient.grpc's package __init__:
    that one registers Triton's gRPC service protos, whose names collide with kserve's (both
    define inference.ServerLiveRequest) and would break every later kserve import."""
    import importlib.util

    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _triton_model_config_pb2()


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, splits: DatasetSplits) -> RunLayout:
    layout = RunLayout.of(tmp_path_factory.mktemp("runs") / "digits")
    train(TrainConfig(out=layout.base, dataset="digits", epochs=1, progress=False), splits=splits)
    base = load_model(layout.base)
    build_ensemble(base, splits, BuildRequest(members=16, eps=0.5), layout.ensemble("symmetry"))
    return layout


@pytest.fixture(scope="module")
def base(run: RunLayout) -> LoadedModel:
    return load_model(run.base)


@pytest.fixture(scope="module")
def exported(run: RunLayout, base: LoadedModel, splits: DatasetSplits, tmp_path_factory):
    from ensemble.artifacts import load_ensemble

    loaded = load_ensemble(run.ensemble("symmetry"), base)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(
        loaded.ensemble,
        path,
        class_names=splits.class_names,
        input_shape=splits.input_shape,
        eps=0.5,
        x_val=splits.val.x,
        x_check=splits.test.x,
    )
    return loaded.ensemble, result


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnx_matches_pytorch(exported, splits: DatasetSplits, batch: int) -> None:
    ensemble, result = exported
    x = torch.cat([splits.test.x, splits.val.x])[:batch]
    outs = _session(result.path).run(list(OUTPUTS), {INPUT: x.numpy()})
    with torch.no_grad():
        ref = ensemble.predict(x)
    assert np.abs(outs[0] - ref.probs.numpy()).max() <= 1e-5
    assert np.array_equal(outs[1], ref.label.numpy())
    assert np.abs(outs[2] - ref.agreement.numpy()).max() <= 1e-6
    assert np.abs(outs[3] - ref.mutual_info.numpy()).max() <= 1e-5
    assert [o.dtype for o in outs] == [np.float32, np.int64, np.float32, np.float32]
    assert [o.shape for o in outs] == [(batch, 10), (batch,), (batch,), (batch,)]
    assert result.parity[batch] <= 1e-5


def test_graph_passes_the_checker_and_has_the_contract(exported, splits: DatasetSplits) -> None:
    _, result = exported
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == INPUT and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) >= CONTRACT_KEYS
    assert meta["orbit.format"] == FORMAT
    assert json.loads(meta["orbit.class_names"]) == splits.class_names
    assert json.loads(meta["orbit.input_shape"]) == [1, 8, 8]
    assert json.loads(meta["orbit.value_range"]) == [0, 1]
    assert (meta["orbit.method"], meta["orbit.members"]) == ("symmetry", "16")
    assert float(meta["orbit.eps"]) == 0.5 and meta["orbit.version"] == __version__
    assert meta["orbit.weights_sha256"] == weights_sha256(model)


def test_weights_hash_tracks_the_weights(exported) -> None:
    _, result = exported
    model = onnx.load(str(result.path))
    before = weights_sha256(model)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    assert weights_sha256(model) != before


def test_mutual_info_threshold_is_a_5_percent_false_positive_rate(exported, splits) -> None:
    _, result = exported
    threshold = float(result.metadata["orbit.mutual_info_threshold"])
    session = _session(result.path)
    for batch in (1, 64, len(splits.val)):  # what the server computes, at any batch size
        mi = np.concatenate(
            [session.run(["mutual_info"], {INPUT: c.numpy()})[0] for c in splits.val.x.split(batch)]
        )
        assert (mi > threshold).mean() <= 0.05
    # No slack: a threshold low enough to flag the largest clean value it lets through would
    # flag more than 5%.
    below = mi[mi < threshold].max()
    assert (mi >= below).mean() > 0.05
    assert threshold > 0


def test_base_is_an_ensemble_of_one(base: LoadedModel, splits: DatasetSplits, tmp_path) -> None:
    result = export_onnx(
        SingleModel(base.model),
        tmp_path / "base.onnx",
        class_names=splits.class_names,
        input_shape=splits.input_shape,
        eps=None,
        x_val=splits.val.x,
        x_check=splits.test.x,
    )
    probs, label, agreement, mi = _session(result.path).run(
        list(OUTPUTS), {INPUT: splits.test.x.numpy()}
    )
    with torch.no_grad():
        ref = torch.softmax(base.model(splits.test.x), -1).numpy()
    assert np.abs(probs - ref).max() <= 1e-5
    assert np.array_equal(label, ref.argmax(-1))
    assert np.all(agreement == 1.0) and np.all(mi == 0.0)
    assert result.metadata["orbit.members"] == "1" and result.metadata["orbit.method"] == "base"
    assert float(result.metadata["orbit.mutual_info_threshold"]) == 0.0


def test_any_fused_ensemble_exports(base: LoadedModel, splits: DatasetSplits, tmp_path) -> None:
    """A deep ensemble (no [N, C, B] fast path) goes through the generic member_logits path."""
    torch.manual_seed(1)
    other = build_model(base.model.spec).eval()
    deep = DeepEnsemble([base.model, other])
    result = export_onnx(
        deep,
        tmp_path / "deep.onnx",
        class_names=splits.class_names,
        input_shape=splits.input_shape,
        eps=None,
        x_val=splits.val.x,
        x_check=splits.test.x,
    )
    assert max(result.parity.values()) <= 1e-5
    assert result.metadata["orbit.method"] == "deep"


def test_triton_repository_parses_with_tritons_protobuf(exported, tmp_path: Path) -> None:
    _, result = exported
    target = write_triton_repository(
        result.path, tmp_path / "repo", name="orbit", input_shape=[1, 8, 8], num_classes=10,
        max_batch_size=128,
    )  # fmt: skip
    assert (target / "1" / "model.onnx").read_bytes() == result.path.read_bytes()
    config = text_format.Parse(
        (target / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == "orbit" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 128
    assert config.HasField("dynamic_batching")
    (inp,) = config.input
    assert (inp.name, list(inp.dims)) == (INPUT, [1, 8, 8])
    assert inp.data_type == model_config_pb2.TYPE_FP32
    outs = {o.name: o for o in config.output}
    assert list(outs) == list(OUTPUTS)
    assert list(outs["probs"].dims) == [10]
    assert outs["label"].data_type == model_config_pb2.TYPE_INT64
    for name in ("label", "agreement", "mutual_info"):
        assert list(outs[name].dims) == [1] and outs[name].HasField("reshape")
        assert list(outs[name].reshape.shape) == []


def test_triton_config_for_other_shapes_parses() -> None:
    text = triton_config("fashion", [3, 32, 32], 100, 16)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert list(config.input[0].dims) == [3, 32, 32] and list(config.output[0].dims) == [100]


def test_kserve_manifest_has_the_required_fields() -> None:
    text = kserve_manifest(
        service="orbit-digits", model_name="orbit", image="registry.example/orbit-serve:0.1.0",
        storage_uri="s3://bucket/digits", max_batch=64,
        metadata={"orbit.method": "symmetry", "orbit.members": "64", "orbit.weights_sha256": "ab"},
    )  # fmt: skip
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "orbit-digits"
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["image"] == "registry.example/orbit-serve:0.1.0"
    assert container["args"][0] == "/mnt/models/model.onnx"
    assert container["args"][container["args"].index("--max-batch") + 1] == "64"
    assert {"name": "STORAGE_URI", "value": "s3://bucket/digits"} in container["env"]
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    with pytest.raises(UserError, match="model name"):
        kserve_manifest(service="Bad_Name", model_name="orbit", image="i", storage_uri="u",
                        max_batch=1, metadata={})  # fmt: skip


def _orbit(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["orbit", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_orbit_export_writes_the_run_export(run: RunLayout, tmp_path, capsys, monkeypatch):
    code, out, err = _orbit(capsys, monkeypatch, "export", "--run", run.root, "--triton",
                            tmp_path / "triton", "--kserve", tmp_path / "isvc.yaml")  # fmt: skip
    assert code == 0, err
    for name in ("model.onnx", "base.onnx"):
        onnx.checker.check_model(onnx.load(str(run.export / name)), full_check=True)
    meta = {p.key: p.value for p in onnx.load(str(run.export / "model.onnx")).metadata_props}
    assert meta["orbit.members"] == "16" and meta["orbit.method"] == "symmetry"
    assert (tmp_path / "triton" / "orbit" / "config.pbtxt").is_file()
    doc = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
    assert doc["metadata"]["annotations"]["orbit/weights-sha256"] == meta["orbit.weights_sha256"]
    assert "parity max |probs diff|" in out

    code, _, err = _orbit(capsys, monkeypatch, "export", "--run", run.root, "--method", "random")
    assert code == 2 and "build it first" in err and err.strip().count("\n") == 0
