"""Every script in examples/ runs to completion as ``python examples/X.py``, the way the docs tell
users to run it, in a fresh interpreter within a time limit.

Run as a script, the script's own folder comes first on ``sys.path``, so an example named like an
installed package (``transformer_lens.py``) would shadow it: no example may take such a name.
The examples check their own numbers (Lanczos against ARPACK and the dense matrix, a CG step
against a dense solve, SLQ's extreme node against the top eigenvalue) and exit non-zero when a
check fails, so a passing run means agreeing numbers, not only an absence of crashes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
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
    "transformer_lens_blocks.py": ("transformer_lens", "sub-matrix of all blocks' Hessian"),
    "per_layer_spectrum.py": ("matplotlib", "the same Gaussian smoothing for every layer"),
    "scipy_interop.py": (None, "cg step vs dense solve"),
    "supervised_mlp.py": (None, "Lanczos, ARPACK and the dense matrix agree."),
    "track_sharpness.py": ("matplotlib", "the monitor's last sharpness agrees with ARPACK."),
}


def installed_top_level_names() -> set[str]:
    """Top-level module names a script could shadow: the standard library, every installed
    distribution's top-level packages, and every module on ``sys.path`` outside examples/."""
    names = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    search_path = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO / "examples"]
    names |= {module.name for module in pkgutil.iter_modules(search_path)}
    return names


def test_every_example_is_listed() -> None:
    assert sorted(path.name for path in EXAMPLES) == sorted(REQUIREMENTS)


def test_no_example_shadows_an_installed_module() -> None:
    shadowing = sorted(path.name for path in EXAMPLES if path.stem in installed_top_level_names())
    assert not shadowing, f"rename these examples, they shadow installed modules: {shadowing}"


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    module, expected = REQUIREMENTS[script.name]
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{script.name} needs {module}")
    # One intra-op thread: fastest for these tiny models, and immune to a busy machine's
    # scheduling (two spinning threads on two shared cores can be 10x slower). PYTHONPATH makes
    # this checkout's torch_linop the one imported, as an editable install would.
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    figure = tmp_path / "per_layer_spectrum.png"
    extra_args = ["--output", str(figure)] if script.name == "per_layer_spectrum.py" else []
    result = subprocess.run(
        # python examples/X.py, from a scratch working directory: examples that write their
        # results next to the caller (track_sharpness.json/.png) must not litter the checkout
        [sys.executable, str(script), *extra_args],
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
    if extra_args:
        assert figure.stat().st_size > 20_000
