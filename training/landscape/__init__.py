"""The paper's four loss-landscape experiments on small two-layer problems (`orbit landscape`).

Each experiment is a module with a config dataclass, `run(config) -> dict` (JSON-ready numbers;
keys starting with '_' are only for the plot) and `plot(result, figure)`. `run_experiment` checks
that it can write into the output directory, runs one, and writes NAME.json and NAME.png there,
atomically. The JSON is strict: a number that is not finite (a diverged run) is written as null.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import tempfile
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


def json_ready(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None (JSON's null) and tuples as
    lists, so that json.dumps(..., allow_nan=False) accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def _os_problem(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where}"


def prepare_out(out: Path) -> list[Path]:
    """Create `out` (and missing parents) and check a file can be created in it, before any work;
    UserError otherwise. Returns the directories it created, deepest first."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".orbit-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _remove_empty(created)
        raise UserError(
            f"--out {out} cannot be used as the output directory ({_os_problem(e)}); give a"
            " directory you can write to"
        ) from None
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; a directory someone put files into meanwhile stays
        with contextlib.suppress(OSError):
            d.rmdir()


def run_experiment(name: str, out: str | Path, config: Any = None) -> tuple[Path, Path, dict]:
    """Run experiment `name`, write out/NAME.json and out/NAME.png; return both paths and the
    result (with the plot-only keys removed, non-finite numbers as None).

    The output directory is created and checked first, so an unusable --out costs nothing; if
    the run fails, directories it created (still empty) are removed again and nothing is written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from training.landscape.common import single_thread

    module = _module(name)
    config = config if config is not None else make_config(name)
    out = Path(out)
    created = prepare_out(out)
    try:
        start = time.perf_counter()
        with single_thread():
            result = module.run(config)
        result["seconds"] = time.perf_counter() - start
        public = json_ready({k: v for k, v in result.items() if not k.startswith("_")})
        text = json.dumps(public, indent=2, allow_nan=False) + "\n"
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        module.plot(result, fig)
        json_path, png_path = out / f"{name}.json", out / f"{name}.png"
        try:  # both or neither: each file is renamed into place only when both are written
            with atomic.atomic_path(png_path) as tmp_png, atomic.atomic_path(json_path) as tmp:
                fig.savefig(tmp_png, format="png", dpi=110)
                tmp.write_text(text, encoding="utf-8")
        except OSError as e:
            raise UserError(
                f"could not write the {name} results into {out} ({_os_problem(e)}); free space or"
                " give another --out"
            ) from None
    except BaseException:
        _remove_empty(created)
        raise
    return json_path, png_path, public
