"""Suite ``kernel``: the fused cross-entropy HVP kernel, by delegating to
``benchmarks/ce_hvp.py`` (written and owned with the kernel) when it is present.

It runs as its own process (it keeps module-level state and parses its own arguments): on the
CPU with ``--dry-run`` under ``TRITON_INTERPRET=1`` (a check of the script; the numbers mean
nothing), on a GPU for real. Arguments the harness does not know are passed through (e.g.
``--quick``). Its report (``ce_hvp.json``) lands in ``<out>/kernel/`` and its table is copied
into this suite's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.suites import RunConfig
from benchmarks.suites._report import SuiteResult

SCRIPT = Path(__file__).resolve().parent.parent / "ce_hvp.py"


def run(config: RunConfig) -> SuiteResult:
    result = SuiteResult("kernel", settings={"script": "benchmarks/ce_hvp.py"})
    if not SCRIPT.exists():
        result.notes.append("benchmarks/ce_hvp.py is not present: nothing to run")
        return result
    folder = config.out / "kernel"
    command = [sys.executable, str(SCRIPT), "--out", str(folder), *config.extra_args]
    environment = dict(os.environ)
    root = str(SCRIPT.parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(
        [root, *filter(None, [environment.get("PYTHONPATH")])]
    )
    if config.device.type != "cuda" or config.smoke:
        command.append("--dry-run")
        environment.setdefault("TRITON_INTERPRET", "1")
        result.notes.append("dry run (tiny shapes, Triton interpreter): the numbers mean nothing")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    result.settings["command"] = " ".join(command[1:])
    result.settings["returncode"] = completed.returncode
    report_path = folder / "ce_hvp.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        result.sections.append(str(report.get("table", "")))
        result.records.extend(report.get("rows", []))
        result.notes.append(f"full report: {report_path}")
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        result.notes.append("ce_hvp.py failed: " + " / ".join(tail))
    return result
