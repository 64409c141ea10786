"""The paper's four loss-landscape experiments on small two-layer problems (`orbit landscape`).

Each experiment is a module with a config dataclass, `run(config) -> dict` (JSON-ready numbers;
keys starting with '_' are only for the plot) and `plot(result, figure)`. `run_experiment` runs one
and writes NAME.json and NAME.png into a directory, atomically.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any

from orbit import atomic
from orbit.errors import UserError

EXPERIMENTS = {
    "dynamics": "DynamicsConfig",
    "distribution": "DistributionConfig",
    "convergence": "ConvergenceConfig",
    "sharpness": "SharpnessConfig",
}


def _module(name: str):  # noqa: ANN202
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"training.landscape.{name}")


def make_config(name: str, **overrides: Any) -> Any:
    """The experiment's config with the given fields replaced (None values are ignored)."""
    cls = getattr(_module(name), EXPERIMENTS[name])
    known = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise UserError(f"{flags} does not apply to the {name} experiment")
    return cls(**given)


def run_experiment(name: str, out: str | Path, config: Any = None) -> tuple[Path, Path, dict]:
    """Run experiment `name`, write out/NAME.json and out/NAME.png; return both paths and the
    result (with the plot-only keys removed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from training.landscape.common import single_thread

    module = _module(name)
    config = config if config is not None else make_config(name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    start = time.perf_counter()
    with single_thread():
        result = module.run(config)
    result["seconds"] = time.perf_counter() - start
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    module.plot(result, fig)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    with atomic.atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    atomic.write_json(json_path, public)
    return json_path, png_path, public
