"""What a reader of the built documentation sees: no Sphinx roles shown literally in the API
reference, math rendered without the network, the command line's sample output and figure as the
command prints and draws them today, and install instructions that agree with each other."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "tools"))

import cli_sample  # noqa: E402  (docs/tools/cli_sample.py)
from sphinx_roles import ROLE, render_roles  # noqa: E402  (docs/tools/sphinx_roles.py)

LEFTOVER_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc):(?:`|<code>)")


@pytest.mark.parametrize(
    ("docstring", "rendered"),
    [
        ("Prefer :func:`lanczos`, which", "Prefer `lanczos()`, which"),
        ("call :meth:`clear_cache` first", "call `clear_cache()` first"),
        ("a :class:`~torch.Tensor` or", "a `Tensor` or"),
        ("see :mod:`torch_linop.solvers.checkpoint`", "see `torch_linop.solvers.checkpoint`"),
        (":py:func:`trace` and :func:`the estimator <trace>`", "`trace()` and `the estimator`"),
        ("plain ``code`` stays", "plain ``code`` stays"),
    ],
)
def test_roles_render_as_inline_code(docstring: str, rendered: str) -> None:
    assert render_roles(docstring) == rendered


def test_no_docstring_keeps_a_role_after_the_extension() -> None:
    """Every role in the package's docstrings (the API reference renders them) is one the
    extension rewrites: none is left after it, whatever its kind."""
    griffe = pytest.importorskip("griffe")
    from sphinx_roles import SphinxRoles

    package = griffe.load(
        "torch_linop", search_paths=[str(REPO)], extensions=griffe.load_extensions(SphinxRoles)
    )
    leftovers = []
    seen_roles = 0

    def visit(obj) -> None:
        nonlocal seen_roles
        if obj.is_alias:
            return
        if obj.docstring is not None:
            if ROLE.search(obj.docstring.value) or LEFTOVER_ROLE.search(obj.docstring.value):
                leftovers.append(obj.path)
        for member in obj.members.values():
            visit(member)

    visit(package)
    for path in (REPO / "solvers").rglob("*.py"):  # the source does use roles
        seen_roles += len(ROLE.findall(path.read_text(encoding="utf-8")))
    assert seen_roles > 0  # the check has something to check
    assert leftovers == []


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return site


def test_built_reference_shows_no_sphinx_roles(built_site: Path) -> None:
    pages = sorted((built_site / "reference").rglob("*.html"))
    assert pages
    leftovers = {
        str(page.relative_to(built_site)): LEFTOVER_ROLE.findall(page.read_text(encoding="utf-8"))
        for page in pages
    }
    assert {page: found for page, found in leftovers.items() if found} == {}
    solvers = (built_site / "reference" / "solvers" / "index.html").read_text(encoding="utf-8")
    assert "<code>lanczos()</code>" in solvers  # rendered, not dropped


def test_site_loads_no_script_or_style_from_the_network(built_site: Path) -> None:
    """MathJax is served from the site itself and no font or stylesheet is fetched, so the
    formulas render offline."""
    remote = re.compile(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"')
    offenders = {
        str(page.relative_to(built_site)): remote.findall(page.read_text(encoding="utf-8"))
        for page in built_site.rglob("*.html")
    }
    assert {page: found for page, found in offenders.items() if found} == {}
    concepts = (built_site / "concepts" / "curvature" / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<script src="([^"]*tex-svg\.js)"', concepts)
    assert match is not None
    bundle = (built_site / "concepts" / "curvature" / match[1]).resolve()
    assert bundle.is_file() and 'VERSION="3.' in bundle.read_text(encoding="utf-8")
    assert "arithmatex" in concepts  # the page has math for it to render


def test_cli_sample_and_figure_are_current(tmp_path: Path) -> None:
    """Reruns the built-in job exactly as the page shows it (``torch-linop``, defaults) and
    compares its output with the page's sample, timings aside, and its figure with
    docs/img/cli_hessian_spectrum.png. If this fails: python docs/tools/cli_sample.py."""
    image = pytest.importorskip("matplotlib.image")
    pytest.importorskip("sklearn")
    fresh = cli_sample.run_builtin_job(tmp_path)
    shown = cli_sample.shown_sample(cli_sample.PAGE.read_text(encoding="utf-8"))
    assert cli_sample.without_timings(shown) == cli_sample.without_timings(fresh), (
        "docs/getting-started/command_line.md's sample is stale: run python docs/tools/cli_sample.py"
    )
    drawn = image.imread(cli_sample.produced_figure(tmp_path))
    committed = image.imread(cli_sample.FIGURE)
    assert drawn.shape == committed.shape
    assert float(np.abs(drawn - committed).mean()) < 2e-3, (
        "stale figure: run docs/tools/cli_sample.py"
    )


def test_install_commands_agree() -> None:
    """README, the home page and the installation page give the same command-line install, the
    CPU-torch step comes before the two commands, and the fallback names a torch version."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    install = (REPO / "docs" / "getting-started" / "install.md").read_text(encoding="utf-8")
    command = 'pip install -e ".[cli]" && torch-linop'
    assert command in readme and command in index
    assert 'pip install -e ".[cli]"' in install
    cpu_step = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert readme.index(cpu_step) < readme.index(command)
    fallback = re.search(r'pip install "torch==(\d+\.\d+\.\d+)"', readme)
    assert fallback is not None and f'"torch=={fallback[1]}"' in install
    assert (
        'pip install -e ".[test,bench]"' in readme and 'pip install -e ".[test,bench]"' in install
    )
