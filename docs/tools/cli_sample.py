"""Regenerate the built-in job's sample output in docs/getting-started/command_line.md and its
figure docs/img/cli_hessian_spectrum.png, so the docs show what ``torch-linop`` prints today.

``python docs/tools/cli_sample.py`` runs ``torch-linop`` (no arguments: the seed, the thread
count and everything else are the defaults) in a temporary directory with this checkout's
``torch_linop`` first on the path, then rewrites the text between the ``cli-sample`` markers and
the PNG. ``--check`` rewrites nothing and exits 1 when the docs are stale (timings aside).
tests/test_docs_rendering.py runs the same check.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "getting-started" / "command_line.md"
FIGURE = REPO / "docs" / "img" / "cli_hessian_spectrum.png"
COMMAND = "torch-linop"  # what the page shows; run as python -m torch_linop
HOME = "/home/you"  # the temporary directory's path is shown as this
BEGIN = "<!-- cli-sample: begin"
END = "<!-- cli-sample: end -->"
BLOCK = re.compile(
    rf"{re.escape(BEGIN)}[^\n]*\n```text\n(?P<body>.*?)\n```\n{re.escape(END)}", re.S
)
TIMES = re.compile(r"^Time  .*$", re.M)
# residuals at rounding level (e.g. 7.8e-16) move with any reordering of float operations
ROUNDING_LEVEL = re.compile(r"\b\d\.\de-1[3-9]\b")


def run_builtin_job(directory: Path) -> str:
    """The job's standard output as the page shows it: the command line, then the report with
    ``directory`` written as ``/home/you``."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-m", "torch_linop"],  # progress bars go to stderr, not shown
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = result.stdout.rstrip().replace(str(directory.resolve()), HOME)
    return f"$ {COMMAND}\n{report}"


def shown_sample(page_text: str) -> str:
    match = BLOCK.search(page_text)
    if match is None:
        raise ValueError(f"{PAGE}: no ```text block between {BEGIN!r} and {END!r} markers")
    return match["body"]


def without_timings(sample: str) -> str:
    """The sample with its ``Time`` line blanked (seconds differ between machines and runs) and
    rounding-level numbers (below 1e-12) replaced by one token (their digits are rounding noise)."""
    return ROUNDING_LEVEL.sub("(rounding)", TIMES.sub("Time  (timings)", sample))


def produced_figure(directory: Path) -> Path:
    return directory / "torch-linop-output" / "hessian_spectrum.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether docs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        sample = run_builtin_job(directory)
        page = PAGE.read_text(encoding="utf-8")
        if args.check:
            stale = without_timings(shown_sample(page)) != without_timings(sample)
            print("stale" if stale else "up to date")
            return int(stale)
        match = BLOCK.search(page)
        if match is None:
            raise SystemExit(f"{PAGE}: add the {BEGIN} ... {END} markers around the sample")
        start, end = match.span("body")
        PAGE.write_text(page[:start] + sample + page[end:], encoding="utf-8")
        shutil.copyfile(produced_figure(directory), FIGURE)
    print(f"wrote {PAGE.relative_to(REPO)} and {FIGURE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
