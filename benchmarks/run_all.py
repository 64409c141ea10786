"""`make bench`: run every benchmark script in turn; each prints the ratios it measures in one run.

With a finished `make demo` (runs/demo), the scripts measure the demo's trained model, its
ensemble and its exported graph; otherwise they measure untrained models of the same shapes.
With Fashion-MNIST installed, the ONNX ratios are also measured on its (untrained) cnn shape.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = Path("runs/demo")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def main() -> int:
    have_run = (RUN / "base" / "model.json").is_file()
    have_onnx = (RUN / "export" / "model.onnx").is_file()
    scripts = [
        ["bench_ensemble.py", *(["--run", str(RUN)] if have_run else [])],
        ["bench_onnx.py", *(["--run", str(RUN)] if have_run else [])],
        ["bench_serve.py", *(["--model", str(RUN / "export" / "model.onnx")] if have_onnx else [])],
    ]
    if FASHION_MNIST.is_dir():  # a larger trunk (28x28 cnn): the heads' share of the cost shrinks
        scripts[1:1] = [["bench_onnx.py", "--dataset", "fashion-mnist"]]
    failed = 0
    for script, *args in scripts:
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        failed += subprocess.call([sys.executable, str(HERE / script), *args]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
