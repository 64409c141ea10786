"""ONNX latency of the exported ensemble, every ratio measured in one run (machines are noisy).

Prints onnxruntime latency of the N-member ensemble graph over the base model's graph at batch 1
and 64, and onnxruntime over PyTorch eager for the same ensemble (the same four outputs). Calls
are interleaved; the median and the minimum (the least disturbed by other load) are both shown.

  .venv/bin/python benchmarks/bench_onnx.py                        # untrained digits cnn, N = 64
  .venv/bin/python benchmarks/bench_onnx.py --run runs/NAME        # a run's base and ensemble
  .venv/bin/python benchmarks/bench_onnx.py --dataset fashion-mnist --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved  # noqa: E402
from ensemble.export import ExportHead, SingleModel, export_onnx  # noqa: E402
from ensemble.symmetry import build_symmetry  # noqa: E402
from training.artifacts import load_model  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.models import ModelSpec, build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory with base/ (an untrained model otherwise)")
    p.add_argument("--dataset", default="digits", help="for the untrained model's shape")
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    args = p.parse_args()
    import onnxruntime as ort

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        base = load_model(Path(args.run) / "base")
        model, splits = base.model, load_dataset(base.info["dataset"])
    else:
        splits = load_dataset(args.dataset)
        mean, std = splits.channel_stats()
        torch.manual_seed(0)
        spec = ModelSpec("cnn", splits.input_shape, splits.num_classes, 64, "leaky_relu", mean, std)
        model = build_model(spec).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = build_symmetry(
            model, splits.train.x, splits.train.y, members=args.members, eps=0.5, anchors=32
        )
    ensemble = build.ensemble
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    # ORT's idle threads otherwise spin between calls and steal the cores from torch's turn
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in (("base", SingleModel(model)), ("ensemble", ensemble)):
            result = export_onnx(
                module,
                Path(tmp) / f"{name}.onnx",
                class_names=splits.class_names,
                input_shape=splits.input_shape,
                eps=0.5,
                x_val=splits.val.x[:256],
                x_check=splits.test.x,
            )
            sessions[name] = ort.InferenceSession(
                str(result.path), opts, providers=["CPUExecutionProvider"]
            )
    head = ExportHead(ensemble).eval()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# bench_onnx: {args.run or 'untrained ' + args.dataset + ' cnn'}, N = {args.members},"
        f" h = 64; onnxruntime {ort.__version__}, torch {torch.__version__};"
        f" threads {args.threads or 'default'}; {os.cpu_count()} CPUs, load {load_avg:.2f}"
    )
    base_macs = multiply_adds(model, splits.test.x[:1])
    h, classes = ensemble.hidden, splits.num_classes
    head_macs = args.members * (h * h + h * classes)
    print(
        f"multiply-adds per image: base {base_macs:,}, ensemble {base_macs + head_macs:,}"
        f" (+ N (h^2 + h C)): the arithmetic alone makes the ensemble"
        f" {(base_macs + head_macs) / base_macs:.2f}x the base"
    )
    for batch in (1, 64):
        x = splits.test.x[:batch]
        feed = {"pixels": x.numpy()}
        with torch.inference_mode():
            med, low = interleaved(
                {
                    "ort_base": lambda feed=feed: sessions["base"].run(None, feed),
                    "ort_ensemble": lambda feed=feed: sessions["ensemble"].run(None, feed),
                    "torch_ensemble": lambda x=x: head(x),
                },
                args.repeats,
                warmup=3,
            )
        print(f"\nbatch {batch}: median (min) latency over {args.repeats} interleaved calls")
        for k in med:
            print(f"  {k:15s} {1e3 * med[k]:8.3f} ms ({1e3 * low[k]:.3f} ms)")
        print(
            f"  ORT ensemble / ORT base      = {med['ort_ensemble'] / med['ort_base']:.2f}x"
            f" ({low['ort_ensemble'] / low['ort_base']:.2f}x on minima)"
        )
        print(
            f"  PyTorch eager / ORT ensemble = {med['torch_ensemble'] / med['ort_ensemble']:.2f}x"
            f" ({low['torch_ensemble'] / low['ort_ensemble']:.2f}x on minima)"
        )


def multiply_adds(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Conv2d and Linear layers of `model` on one input x [1, ...]."""
    total = 0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.weight[0].numel()  # in_channels/groups * kernel, or in_features
        total += output[0].numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


if __name__ == "__main__":
    main()
