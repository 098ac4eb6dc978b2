"""Smoke test of benchmarks/llm_scale.py at toy size: every phase runs and converges, the bf16
eigenvalues agree with the fp32 ones, and --resume keeps finished phases. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, *extra: str) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / "llm_scale.py"), "--smoke"]
    command += ["--out", str(out), "--skip", "seed_library", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny products: threads only contend
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "llm_scale.json").read_text())


def test_every_phase_runs_and_a_resume_keeps_them(tmp_path: Path) -> None:
    rows = {row["phase"]: row for row in run(tmp_path, "--checkpoints", str(tmp_path))["rows"]}
    assert not [row for row in rows.values() if "error" in row]
    for phase in ("hessian top-10", "ggn top-10", "bf16 hessian top-10"):
        assert rows[phase]["converged"] == 10
    assert rows["hutch++ trace"]["matvecs"] == 99
    assert rows["bf16 hessian top-10"]["max_rel_diff_vs_fp32"] < 1e-2
    assert rows["ggn top-10"]["eigenvalues"][0] > 0
    resumed = run(tmp_path, "--resume", "--skip", "bf16")
    kept = {row["phase"]: row for row in resumed["rows"]}
    assert kept["hessian top-10"]["seconds"] == rows["hessian top-10"]["seconds"]
