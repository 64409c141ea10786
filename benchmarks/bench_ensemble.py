"""Symmetry-ensemble performance, every ratio measured in one run (machines are noisy).

Prints: build time for N = 64 and 256 (h = 64); fused forward over the base model's at batch 1 and
256; fused forward over a loop of N materialised member models. With --sweep, the eps trade-off
(ensemble accuracy and member agreement with the base) used to choose the default eps.

  .venv/bin/python benchmarks/bench_ensemble.py                      # untrained digits cnn
  .venv/bin/python benchmarks/bench_ensemble.py --run runs/digits-cnn --sweep 0.1,0.5,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved  # noqa: E402
from ensemble.fidelity import anchor_errors  # noqa: E402
from ensemble.symmetry import build_symmetry, materialize_member  # noqa: E402
from training.artifacts import load_model  # noqa: E402
from training.datasets import DatasetSplits, load_dataset  # noqa: E402
from training.models import ModelSpec, OrbitClassifier, build_model  # noqa: E402


def seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median and minimum wall time of fn."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def load(run: str | None) -> tuple[OrbitClassifier, DatasetSplits, str]:
    if run:
        loaded = load_model(Path(run) / "base")
        return loaded.model, load_dataset(loaded.info["dataset"]), f"trained model of {run}"
    splits = load_dataset("digits")
    mean, std = splits.channel_stats()
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", splits.input_shape, 10, 64, "leaky_relu", mean, std))
    return model.eval(), splits, "untrained digits cnn (timings do not depend on the weights)"


def bench_build(model: OrbitClassifier, splits: DatasetSplits, members: list[int], reps: int):
    print("\n## build (anchors, features, group elements, batched solve, fold; h = 64, k = 32)")
    for n in members:

        def run(n: int = n) -> object:
            return build_symmetry(
                model, splits.train.x, splits.train.y, members=n, eps=0.5, anchors=32
            )

        med, low = seconds(run, reps)
        print(f"N = {n:4d}: {med:.3f} s median, {low:.3f} s min of {reps}")


def bench_forward(model: OrbitClassifier, splits: DatasetSplits, n: int, reps: int) -> None:
    build = build_symmetry(model, splits.train.x, splits.train.y, members=n, eps=0.5, anchors=32)
    ens = build.ensemble
    loop = [materialize_member(model, build.g[i], build.u[i]) for i in range(n)]
    print(f"\n## forward, N = {n} (torch {torch.__version__}, {reps} interleaved calls)")
    for batch in (1, 256):
        x = splits.test.x[:batch] if batch <= len(splits.test) else torch.rand(batch, 1, 8, 8)
        if x.shape[0] < batch:
            x = torch.cat([x] * (batch // x.shape[0] + 1))[:batch]
        with torch.inference_mode():
            fns = {
                "base": lambda x=x: model(x),
                "fused": lambda x=x: ens(x),
                "loop": lambda x=x: torch.stack([m(x) for m in loop]),
            }
            t, low = interleaved(fns, reps)
        print(
            f"batch {batch:3d}: median (min) base {1e3 * t['base']:.3f} ({1e3 * low['base']:.3f})"
            f" ms, fused {1e3 * t['fused']:.3f} ({1e3 * low['fused']:.3f}) ms,"
            f" loop of {n} materialised members {1e3 * t['loop']:.1f} ({1e3 * low['loop']:.1f}) ms"
        )
        print(
            f"           fused / base = {t['fused'] / t['base']:.2f}x"
            f" ({low['fused'] / low['base']:.2f}x on minima),"
            f" loop / fused = {t['loop'] / t['fused']:.1f}x ({low['loop'] / low['fused']:.1f}x)"
        )


@torch.no_grad()
def sweep(model: OrbitClassifier, splits: DatasetSplits, grid: list[float], n: int) -> None:
    xt, yt = splits.test.x, splits.test.y
    base_pred = torch.cat([model(c).argmax(-1) for c in xt.split(1000)])
    base_acc = float((base_pred == yt).float().mean())
    print(f"\n## eps sweep (N = {n}, k = 32, seed 0; test n = {len(yt)}; base {base_acc:.4f})")
    print("| eps | ensemble acc | change (points) | member agreement mean / min | max anchor err |")
    print("|---|---|---|---|---|")
    for eps in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = build_symmetry(
                model, splits.train.x, splits.train.y, members=n, eps=eps, anchors=32
            )
        labels, votes = [], []
        for c in xt.split(1000):
            logits = b.ensemble.member_logits(c)
            labels.append(logits.softmax(-1).mean(0).argmax(-1))
            votes.append(logits.argmax(-1))
        acc = float((torch.cat(labels) == yt).float().mean())
        agree = (torch.cat(votes, 1) == base_pred).float().mean(1)
        err = float(anchor_errors(b.ensemble, model, splits.train.x, b.anchors).max())
        print(
            f"| {eps:g} | {acc:.4f} | {100 * (acc - base_acc):+.2f} |"
            f" {float(agree.mean()):.4f} / {float(agree.min()):.4f} | {err:.1e} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory with base/ (default: an untrained digits cnn)")
    p.add_argument("--members", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sweep", help="comma-separated eps values: print the trade-off table")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, splits, what = load(args.run)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# bench_ensemble: {what}; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs,"
        f" load average {load_avg:.2f}"
    )
    if args.sweep:
        sweep(model, splits, [float(e) for e in args.sweep.split(",")], args.members[0])
        return
    bench_build(model, splits, args.members, max(3, args.repeats // 4))
    bench_forward(model, splits, args.members[0], args.repeats)


if __name__ == "__main__":
    main()
