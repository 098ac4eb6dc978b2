"""Every script in examples/ runs to completion in a fresh interpreter within a time limit.

The examples check their own numbers (Lanczos against ARPACK and the dense matrix, a CG step
against a dense solve, SLQ's extreme node against the top eigenvalue) and exit non-zero when a
check fails, so a passing run means agreeing numbers, not only an absence of crashes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
TIME_LIMIT_S = 240  # generous for a busy CI machine; each example takes well under 60 s alone

# What each example needs beyond the core dependencies, and a line its output must contain.
REQUIREMENTS = {
    "huggingface_gpt2.py": ("transformers", "Lanczos and ARPACK agree on the attention block."),
    "transformer_lens.py": ("transformer_lens", "sub-matrix of all blocks' Hessian"),
    "per_layer_spectrum.py": ("matplotlib", "wrote per_layer_spectrum.png"),
    "scipy_interop.py": (None, "cg step vs dense solve"),
    "supervised_mlp.py": (None, "Lanczos, ARPACK and the dense matrix agree."),
    "track_sharpness.py": ("matplotlib", "the monitor's last sharpness agrees with ARPACK."),
}

# Run the script as __main__, but first hide a torchvision that is installed yet cannot be
# imported (a CUDA wheel beside a CPU-only torch): transformers would otherwise fail to import.
RUNNER = (
    "import runpy, sys\n"
    "from torch_linop.cli.hf import hide_broken_torchvision\n"
    "hide_broken_torchvision()\n"
    "path = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(path, run_name='__main__')\n"
)


def test_every_example_is_listed() -> None:
    assert sorted(path.name for path in EXAMPLES) == sorted(REQUIREMENTS)


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    module, expected = REQUIREMENTS[script.name]
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{script.name} needs {module}")
    # One intra-op thread: fastest for these tiny models, and immune to a busy machine's
    # scheduling (two spinning threads on two shared cores can be 10x slower).
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
    )
    assert result.returncode == 0, (
        f"{script.name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    )
    assert expected in result.stdout, result.stdout
    if script.name == "per_layer_spectrum.py":
        assert (tmp_path / "per_layer_spectrum.png").stat().st_size > 20_000
