"""The documentation builds strictly and every Python snippet in it runs.

Snippet rule (also stated in docs/index.md's "About the code on these pages"): every fenced block
whose info string starts with ``python`` or ``py`` in README.md and docs/**/*.md is executed. The
blocks of one page run in order in one namespace (so a page can build an example up step by step);
each page starts from a fresh namespace in its own temporary working directory. A block preceded
directly by ``<!-- snippet: skip REASON -->`` is reported as skipped with that reason instead (for
code that cannot run on a CPU-only test machine, e.g. multi-GPU launches). A failing block fails
the test with the file and the line where the block starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from torch_linop.cli.hf import hide_broken_torchvision

# A torchvision that is installed but cannot be imported would make transformers fail on import:
# hide it before any snippet imports transformers (which caches whether torchvision exists).
hide_broken_torchvision()

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
SKIP_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*skip\s+(?P<reason>.+?)\s*-->\s*$")
PYTHON_INFO = re.compile(r"^\{?\s*\.?(python3?|py)\b")


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block: its source, the 1-based line of its opening fence, skip reason."""

    path: Path
    line: int
    source: str
    skip_reason: str | None


def extract_snippets(path: Path) -> list[Snippet]:
    """The Python blocks of a Markdown file, in order (fences may be indented, e.g. in tabs)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets: list[Snippet] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        ticks, indent = match["ticks"], match["indent"]
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
        end = index + 1
        while end < len(lines) and closing.match(lines[end]) is None:
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: code fence is never closed")
        if PYTHON_INFO.match(match["info"].strip()):
            body = textwrap.dedent("\n".join(lines[index + 1 : end]))
            previous = lines[index - 1] if index > 0 else ""
            skip = SKIP_MARKER.match(previous)
            snippets.append(Snippet(path, index + 1, body, skip["reason"] if skip else None))
        index = end + 1
    return snippets


def run_page(snippets: list[Snippet]) -> list[Snippet]:
    """Execute the runnable snippets of one page in one namespace; return the skipped ones.

    Line numbers in tracebacks are the Markdown file's own (the source is padded accordingly).
    """
    namespace: dict[str, object] = {"__name__": "__docs__"}
    skipped = []
    for number, snippet in enumerate(snippets, start=1):
        if snippet.skip_reason is not None:
            skipped.append(snippet)
            continue
        padded = "\n" * snippet.line + snippet.source
        try:
            exec(compile(padded, str(snippet.path), "exec"), namespace)
        except Exception:
            pytest.fail(
                f"{snippet.path}:{snippet.line}: python block #{number} of this page failed:\n"
                f"{traceback.format_exc()}",
                pytrace=False,
            )
    return skipped


def documentation_pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [page for page in pages if page.is_file()]


PAGES = [page for page in documentation_pages() if extract_snippets(page)]


@pytest.fixture
def clean_state(tmp_path, monkeypatch):
    """A fresh working directory, a headless matplotlib, one intra-op thread (fastest for the
    pages' tiny models), torch's global state restored after."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    default_dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
    torch.set_default_dtype(default_dtype)
    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib.pyplot as plt

        plt.close("all")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_snippets_run(page: Path, clean_state) -> None:
    skipped = run_page(extract_snippets(page))
    if skipped:
        reasons = "; ".join(f"line {s.line}: {s.skip_reason}" for s in skipped)
        pytest.skip(f"{page.relative_to(REPO)}: ran the other blocks, skipped {reasons}")


def test_every_page_has_been_collected() -> None:
    """The harness sees the pages that carry code (guards against a broken fence regex)."""
    collected = {page.relative_to(REPO).as_posix() for page in PAGES}
    assert "README.md" in collected or not extract_snippets(REPO / "README.md")
    assert "docs/getting-started/quickstart.md" in collected


def test_extractor_and_runner_report_file_and_line(tmp_path: Path) -> None:
    """A failing block fails with its file and line; skip markers, indentation and other
    languages are handled."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "```bash\n"
        "echo not python\n"
        "```\n"
        "\n"
        "```python\n"
        "x = 2\n"
        "```\n"
        '=== "Tab"\n'
        "\n"
        '    ```python title="indented"\n'
        "    y = x + 1\n"
        "    ```\n"
        "<!-- snippet: skip needs 8 GPUs -->\n"
        "```python\n"
        "raise SystemExit('never run')\n"
        "```\n"
        "````py\n"
        "assert y == 3\n"
        "1 / 0\n"
        "````\n",
        encoding="utf-8",
    )
    snippets = extract_snippets(page)
    assert [s.line for s in snippets] == [6, 11, 15, 18]
    assert snippets[1].source == "y = x + 1"
    assert [s.skip_reason for s in snippets] == [None, None, "needs 8 GPUs", None]
    with pytest.raises(pytest.fail.Exception) as failure:
        run_page(snippets)
    message = str(failure.value)
    assert f"{page}:18: python block #4" in message
    assert "ZeroDivisionError" in message
    assert f'File "{page}", line 20' in message  # the Markdown line of `1 / 0`
    assert run_page(snippets[:3]) == [snippets[2]]


def _have_mkdocs() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return module
        if "." in module and importlib.util.find_spec(module) is None:
            return module
    return None


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = _have_mkdocs()
    if missing is not None:
        pytest.skip(f"{missing} is not installed: pip install -e '.[docs]' to build the docs")
    env = {**os.environ, "MPLBACKEND": "Agg", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "operators" / "index.html").is_file()
