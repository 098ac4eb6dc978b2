"""The repository layout: ``kernels/`` and ``solvers/`` import as ``torch_linop.kernels`` and
``torch_linop.solvers``, and the top-level name ``kernels`` stays HuggingFace's (transformers
imports it by name) even where the repository root is on ``sys.path``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import kernels
import torch_linop.kernels, torch_linop.solvers
result = {"kernels": kernels.__file__, "ours": torch_linop.kernels.__file__,
          "ce_hvp": hasattr(torch_linop.kernels, "ce_hvp"),
          "lanczos": hasattr(torch_linop.solvers, "lanczos")}
try:
    import transformers
    transformers.GPT2Config  # its import of the hub-kernel integration looks for ``kernels``
    result["transformers"] = "ok"
except ImportError as error:
    result["transformers"] = f"failed: {error}"
print(json.dumps(result))
"""


def run_in_root(code: str) -> dict:
    """Run ``code`` with the repository root first on sys.path (as ``python -c`` there does)."""
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_package_folders_are_linked_into_the_package():
    for name in ("kernels", "solvers"):
        link = ROOT / "torch_linop" / name
        assert link.is_symlink() and Path(link.readlink()) == Path("..") / name
        assert (ROOT / name / "__init__.py").is_file()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_repository_root_on_sys_path_keeps_the_top_level_kernels_name():
    result = run_in_root(PROBE)
    assert result["ce_hvp"] and result["lanczos"]
    assert Path(result["ours"]).resolve().parent == (ROOT / "kernels").resolve()
    assert result["transformers"] == "ok", result["transformers"]
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")  # HuggingFace's kernels is installed: the name must be its own
    except PackageNotFoundError:
        return
    assert Path(result["kernels"]).resolve().parent != (ROOT / "kernels").resolve()
