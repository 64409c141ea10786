"""The serving image's Dockerfile: hadolint reports nothing, and it states what the issue asks
(slim base, `.[serve]` only, non-root, EXPOSE, HEALTHCHECK on readiness, `orbit serve`).

No Docker engine exists where these tests run, so the image itself is not built here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from onnx_fixtures import REPO

HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKERFILE = REPO / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_reports_nothing():
    out = _hadolint(DOCKERFILE)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_hadolint_does_flag_a_sloppy_dockerfile(tmp_path):
    """The clean result above means something: the same linter finds faults in a bad file."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install kserve\nRUN cd /tmp\n")
    out = _hadolint(bad)
    assert out.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", out.stdout))


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_final_stage_is_slim_nonroot_serve_only_with_healthcheck():
    ins = _instructions()
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    ops = dict(final)  # last value per instruction in the final stage
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", ops["FROM"]), ops["FROM"]
    assert ops["USER"].split(":")[0] not in ("0", "root")
    assert ops["EXPOSE"] == "8080"
    assert "/v2/health/ready" in ops["HEALTHCHECK"] and "CMD" in ops["HEALTHCHECK"]
    assert json.loads(ops["ENTRYPOINT"]) == ["orbit", "serve"]
    assert "--host" in json.loads(ops["CMD"])  # 0.0.0.0 inside the container, stated explicitly
    installs = [arg for op, arg in ins if op == "RUN" and "pip install" in arg]
    assert installs and all('".[serve]"' in arg for arg in installs)
    assert not any(re.search(r"pip install[^&;]*torch", arg) for _, arg in ins)
