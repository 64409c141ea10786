"""The run-directory layout: the only place that knows where a run's files live.

runs/NAME/base/                 the base model (model.safetensors, model.json, metrics.json)
runs/NAME/adv/                  an adversarially trained base model (optional baseline)
runs/NAME/ensemble/METHOD/      ensemble.safetensors, ensemble.json, fidelity.json
runs/NAME/report/               report.json, report.md, *.png
runs/NAME/export/               model.onnx, base.onnx, triton/, kserve.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENSEMBLE_METHODS = ("symmetry", "random", "deep")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run: str | Path) -> RunLayout:
        return cls(Path(run))

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adv(self) -> Path:
        return self.root / "adv"

    def ensemble(self, method: str) -> Path:
        return self.root / "ensemble" / method

    @property
    def deep_members(self) -> Path:
        return self.ensemble("deep") / "members"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def built_ensembles(self) -> dict[str, Path]:
        """The ensembles built for this run, by method, in a fixed order."""
        return {
            m: self.ensemble(m)
            for m in ENSEMBLE_METHODS
            if (self.ensemble(m) / "ensemble.json").is_file()
        }
