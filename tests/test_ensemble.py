"""Symmetry and random ensembles on a real (briefly trained) digits model: exactness, fusion,
seeds, matched distances, gradients, artifacts and the fidelity certificate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble.anchors import member_anchors
from ensemble.artifacts import DESCRIPTION, FIDELITY, TENSORS, load_ensemble
from ensemble.base import FusedEnsemble, summarize
from ensemble.build import BuildRequest, build_ensemble
from ensemble.fidelity import split_fidelity
from ensemble.perturbed import build_random, perturbed_distance
from ensemble.symmetry import SymmetryEnsemble, build_symmetry, materialize_member
from orbit.errors import UserError
from training.artifacts import LoadedModel, load_model, save_model
from training.config import TrainConfig
from training.datasets import DatasetSplits, load_dataset
from training.models import ACTIVATIONS, ModelSpec, build_model
from training.train import train

N, K = 16, 32


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, splits: DatasetSplits) -> LoadedModel:
    """The default digits cnn (h = 64, leaky_relu), trained briefly by the real pipeline."""
    out = tmp_path_factory.mktemp("run") / "base"
    train(TrainConfig(out=out, dataset="digits", epochs=2, progress=False), splits=splits)
    return load_model(out)


def _untrained(activation: str, splits: DatasetSplits, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mean, std = splits.channel_stats()
    spec = ModelSpec("cnn", splits.input_shape, 10, 64, activation, mean, std)
    return build_model(spec).eval()


def _own_anchor_error(build, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """max |member n - base| logits over member n's own anchors, for every member."""
    errors = []
    with torch.no_grad():
        for n in range(build.anchors.shape[0]):
            xa = x[build.anchors[n]]
            errors.append((build.ensemble.member_logits(xa)[n] - base(xa)).abs().amax())
    return torch.stack(errors)


def test_anchors_are_stratified_distinct_and_seeded(splits: DatasetSplits) -> None:
    y = splits.train.y
    idx = member_anchors(y, 32, 5, seed=1)
    assert idx.shape == (5, 32)
    for row in idx:
        assert len(torch.unique(row)) == 32
        counts = torch.bincount(y[row], minlength=10)
        assert int(counts.max() - counts.min()) <= 1  # 32 over 10 classes: 3 or 4 each
    assert torch.equal(idx, member_anchors(y, 32, 5, seed=1))
    assert torch.equal(idx[:2], member_anchors(y, 32, 2, seed=1))
    assert not torch.equal(idx, member_anchors(y, 32, 5, seed=2))
    assert not torch.equal(idx[0], idx[1])
    with pytest.raises(UserError, match="more than the"):
        member_anchors(y, len(y) + 1, 1, seed=0)
    with pytest.raises(UserError, match="--anchors"):
        member_anchors(y, 0, 1, seed=0)


def test_trained_members_are_exact_on_their_anchors_in_float32(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    """The issue's figure: max |logit diff| on anchors <= 1e-4 in float32 for every member."""
    b = build_symmetry(trained.model, splits.train.x, splits.train.y, members=N, eps=0.5, anchors=K)
    err = _own_anchor_error(b, trained.model, splits.train.x)
    assert err.amax() <= 1e-4
    with torch.no_grad():  # and the members do move away from the base elsewhere
        off = (b.ensemble.member_logits(splits.test.x) - trained.model(splits.test.x)).abs()
    assert off.amax(dim=(1, 2)).min() > 100 * err.amax()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_exact_on_anchors_for_every_activation(activation: str, splits: DatasetSplits) -> None:
    model = _untrained(activation, splits)
    b = build_symmetry(model, splits.train.x, splits.train.y, members=8, eps=0.5, anchors=K)
    err = _own_anchor_error(b, model, splits.train.x)
    with torch.no_grad():
        scale = model(splits.train.x).abs().amax()
        off = (b.ensemble.member_logits(splits.test.x) - model(splits.test.x)).abs().amax()
    assert err.amax() <= 1e-4
    assert err.amax() <= 1e-5 * max(1.0, float(scale))
    assert off > 100 * err.amax()


def test_fused_equals_materialised_members(trained: LoadedModel, splits: DatasetSplits) -> None:
    b = build_symmetry(trained.model, splits.train.x, splits.train.y, members=N, eps=0.5, anchors=K)
    x = splits.test.x[:100]
    with torch.no_grad():
        fused = b.ensemble.member_logits(x)
        loop = torch.stack([materialize_member(trained.model, b.g[n], b.u[n])(x) for n in range(N)])
        assert (fused - loop).abs().amax() < 1e-4
        # forward() is the log of the mean member probability; predict() summarises the same
        mean_p = torch.softmax(loop, dim=-1).mean(0)
        assert torch.allclose(b.ensemble(x).exp(), mean_p, atol=1e-5)
        pred = b.ensemble.predict(x)
        assert torch.allclose(pred.probs, summarize(loop).probs, atol=1e-5)


def test_seeds_reproduce_and_differ(trained: LoadedModel, splits: DatasetSplits) -> None:
    args = dict(members=4, eps=0.5, anchors=K)
    x, y = splits.train.x, splits.train.y
    a = build_symmetry(trained.model, x, y, seed=7, **args)
    b = build_symmetry(trained.model, x, y, seed=7, **args)
    c = build_symmetry(trained.model, x, y, seed=8, **args)
    assert torch.equal(a.g, b.g) and torch.equal(a.u, b.u) and torch.equal(a.anchors, b.anchors)
    assert not torch.equal(a.g, c.g)
    assert not torch.equal(a.anchors, c.anchors)


def test_gradients_reach_the_trunk_and_the_input(trained: LoadedModel, splits: DatasetSplits):
    b = build_symmetry(trained.model, splits.train.x, splits.train.y, members=4, eps=0.5, anchors=K)
    x = splits.test.x[:8].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(b.ensemble(x), splits.test.y[:8])
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    trunk_grads = [p.grad for p in b.ensemble.trunk.parameters()]
    assert all(g is not None for g in trunk_grads)
    assert sum(float(g.abs().sum()) for g in trunk_grads) > 0


def test_bad_build_arguments_are_user_errors(trained: LoadedModel, splits: DatasetSplits):
    x, y = splits.train.x, splits.train.y
    with pytest.raises(UserError, match="--eps"):
        build_symmetry(trained.model, x, y, members=2, eps=0.0, anchors=K)
    with pytest.raises(UserError, match="--members"):
        build_symmetry(trained.model, x, y, members=0, eps=0.1, anchors=K)
    with pytest.raises(UserError, match="more than the"):
        build_symmetry(trained.model, x, y, members=2, eps=0.1, anchors=len(y) + 1)
    with pytest.raises(UserError, match="no symmetry slot"):
        build_symmetry(nn.Sequential(nn.Flatten()), x, y, members=2, eps=0.1, anchors=K)


def test_ill_conditioned_members_are_redrawn_then_refused(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    x, y = splits.train.x, splits.train.y
    ok = build_symmetry(trained.model, x, y, members=8, eps=0.5, anchors=K)
    cut = float(ok.condition.median())  # about half the first draws fail this bound
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_symmetry(trained.model, x, y, members=8, eps=0.5, anchors=K, max_condition=cut)
    assert int(b.redraws.sum()) > 0
    assert bool((b.condition <= cut).all())
    assert any("redrew" in str(w.message) for w in caught)
    with pytest.raises(UserError, match=r"after 2 redraws.*condition number"):
        build_symmetry(
            trained.model, x, y, members=8, eps=0.5, anchors=K, max_condition=1.0, max_redraws=2
        )


def test_rank_deficient_relu_slot_is_refused(splits: DatasetSplits) -> None:
    """A relu slot whose units are dead on the anchors cannot be exact: one line with numbers."""
    model = _untrained("relu", splits)
    with torch.no_grad():
        model.slot.fc1.bias[8:] = -1e3  # at least 56 of 64 units never fire
    with pytest.raises(UserError, match=r"rank-deficient \(rank [1-8] < 32, (5[6-9]|6\d) of 64"):
        build_symmetry(model, splits.train.x, splits.train.y, members=2, eps=0.01, anchors=K)


def test_dead_relu_units_in_the_least_squares_regime_are_a_warning(splits: DatasetSplits) -> None:
    """With k > h the fit is approximate anyway: dead units shrink it, they do not stop it."""
    model = _untrained("relu", splits)
    with torch.no_grad():
        model.slot.fc1.bias[48:] = -1e3  # 16 of 64 units never fire
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_symmetry(model, splits.train.x, splits.train.y, members=2, eps=0.01, anchors=128)
    messages = " ".join(str(w.message) for w in caught)
    assert "APPROXIMATE" in messages and "zero on all their anchors" in messages
    assert bool(torch.isfinite(b.condition).all())


def test_a_group_step_too_far_for_float32_is_redrawn_or_refused(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    """Far from the identity g is ill-conditioned and float32 loses exactness even when
    sigma(H0 g^T) is well conditioned: no member past the float32 budget may be accepted."""
    x, y = splits.train.x, splits.train.y
    try:
        b = build_symmetry(trained.model, x, y, members=4, eps=20.0, anchors=K)
    except UserError as e:
        assert "float32 logits differ" in str(e) or "condition number" in str(e)
    else:
        assert float(b.anchor_error.max()) <= 1e-4
        assert float(_own_anchor_error(b, trained.model, x).max()) <= 1e-4
    with pytest.raises(UserError, match="overflows float64 at --eps 800"):
        build_symmetry(trained.model, x, y, members=2, eps=800.0, anchors=K)


def test_more_anchors_than_width_warns_and_is_approximate(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    with pytest.warns(UserWarning, match="APPROXIMATE"):
        b = build_symmetry(
            trained.model, splits.train.x, splits.train.y, members=4, eps=0.5, anchors=128
        )
    assert b.residual.amin() > 1e-6


def test_random_baseline_matches_the_distance_and_is_not_exact(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    sym = build_symmetry(
        trained.model, splits.train.x, splits.train.y, members=N, eps=0.5, anchors=K
    )
    rnd = build_random(trained.model, sym.distance, seed=0)
    dist = perturbed_distance(rnd, trained.model)
    assert torch.allclose(dist, sym.distance, rtol=1e-4)
    assert float(dist.min()) > 0.1
    assert not torch.allclose(rnd.member_heads()[0][0], rnd.member_heads()[0][1])
    x = splits.test.x[:50]
    with torch.no_grad():  # fused == the loop over materialised random members
        w1, b1, w2 = rnd.member_heads()
        z = trained.model.features(x)
        loop = torch.stack(
            [rnd.act(z @ w1[n].T + b1[n]) @ w2[n].T + trained.model.slot.fc2.bias for n in range(N)]
        )
        assert (rnd.member_logits(x) - loop).abs().amax() < 1e-4
    assert _own_anchor_error_random(rnd, sym, trained.model, splits.train.x) > 1e-2


def _own_anchor_error_random(rnd, sym, base: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        xa = x[sym.anchors[0]]
        return float((rnd.member_logits(xa)[0] - base(xa)).abs().amax())


@pytest.mark.parametrize("method", ["symmetry", "random"])
def test_build_round_trip_and_fidelity(
    method: str, trained: LoadedModel, splits: DatasetSplits, tmp_path: Path
) -> None:
    request = BuildRequest(method=method, members=8, eps=0.5, seed=3)
    outcome = build_ensemble(trained, splits, request, tmp_path)
    info = json.loads((tmp_path / DESCRIPTION).read_text())
    assert info["base_weights_sha256"] == trained.weights_sha256
    assert (info["method"], info["members"], info["eps"], info["anchors"]) == (method, 8, 0.5, 32)
    fid = json.loads((tmp_path / FIDELITY).read_text())
    assert len(fid["per_member"]) == 8
    assert set(fid["splits"]) == {"train", "val", "test"}
    test = fid["splits"]["test"]
    assert test["samples"] == len(splits.test)
    assert 0.0 <= test["member_agreement_with_base"]["min"] <= 1.0
    if method == "symmetry":
        assert fid["anchors"]["max_abs_logit_diff"] <= 1e-4
        assert all(m["condition_number"] > 1 for m in fid["per_member"])
    else:
        assert fid["anchors"]["max_abs_logit_diff"] > 1e-2
    loaded = load_ensemble(tmp_path, trained)
    x = splits.test.x[:32]
    with torch.no_grad():
        assert torch.equal(loaded.ensemble.member_logits(x), outcome.ensemble.member_logits(x))


def test_loading_refuses_other_base_weights_and_corrupt_files(
    trained: LoadedModel, splits: DatasetSplits, tmp_path: Path
) -> None:
    ens_dir = tmp_path / "ens"
    build_ensemble(trained, splits, BuildRequest(members=4, eps=0.5), ens_dir)
    other = build_model(trained.model.spec)
    other_dir = tmp_path / "other"
    save_model(other_dir, other, {"dataset": "digits"})
    with pytest.raises(UserError, match="was built for base weights"):
        load_ensemble(ens_dir, load_model(other_dir))
    data = bytearray((ens_dir / TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (ens_dir / TENSORS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match"):
        load_ensemble(ens_dir, trained)
    (ens_dir / DESCRIPTION).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_ensemble(ens_dir, trained)
    with pytest.raises(UserError, match="not found"):
        load_ensemble(tmp_path / "missing", trained)


def test_ensemble_needs_the_base_training_data(trained: LoadedModel, tmp_path: Path) -> None:
    synthetic = load_dataset("synthetic")
    with pytest.raises(UserError, match="fingerprint"):
        build_ensemble(trained, synthetic, BuildRequest(members=2), tmp_path)


def test_symmetry_ensemble_rejects_mismatched_tensors(trained: LoadedModel) -> None:
    with pytest.raises(ValueError, match="U has shape"):
        SymmetryEnsemble(trained.model, torch.eye(64).expand(2, 64, 64), torch.zeros(2, 64, 3))


class _Opaque(FusedEnsemble):
    """Hides everything but member_logits: fidelity must then run the full modules."""

    def __init__(self, inner: FusedEnsemble) -> None:
        super().__init__()
        self.inner = inner

    @property
    def num_members(self) -> int:
        return self.inner.num_members

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.member_logits(x)


def test_fidelity_shared_trunk_shortcut_changes_nothing(
    trained: LoadedModel, splits: DatasetSplits
) -> None:
    b = build_symmetry(trained.model, splits.train.x, splits.train.y, members=8, eps=2.0, anchors=K)
    fast = split_fidelity(b.ensemble, trained.model, splits.test)
    slow = split_fidelity(_Opaque(b.ensemble), trained.model, splits.test)
    assert fast == slow
    assert fast["member_agreement_with_base"]["min"] < 1.0  # a case where members do differ
