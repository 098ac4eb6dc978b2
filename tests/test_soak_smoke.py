"""benchmarks/soak.py: the leak detector flags growth after the warm-up and accepts a plateau,
and the script runs end to end on a tiny budget (its verdicts are not asserted: at these sizes
the allocator's noise is the signal)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import soak  # noqa: E402

MIB = 1024**2


def trace_of(series: list[int], run_ends: list[int] | None = None) -> soak.Trace:
    trace = soak.Trace("synthetic", "cpu", rss=series)
    if run_ends:
        trace.run_ends, trace.warmup = run_ends, run_ends[0]
    return trace


def test_growth_after_the_warm_up_is_a_failure():
    flat = [300 * MIB + (i % 7) * 1024 for i in range(1000)]  # allocator jitter, no trend
    leak = [300 * MIB + i * 64 * 1024 for i in range(1000)]  # 64 KiB per product
    assert trace_of(flat).summary()["verdict"] == "ok"
    summary = trace_of(leak).summary()
    assert summary["verdict"].startswith("FAILURE")
    assert summary["rss"]["trend_kib"] == pytest.approx(64, rel=1e-6)
    assert summary["warmup"] == 100


def test_repeated_runs_compare_run_peaks():
    one_run = [300 * MIB, 340 * MIB, 310 * MIB]  # a basis allocated, then freed: once per run
    plateau = one_run * 4
    creeping = [value + run * 30 * MIB for run in range(4) for value in one_run]
    ends = [3, 6, 9, 12]
    assert trace_of(plateau, ends).summary()["verdict"] == "ok"
    summary = trace_of(creeping, ends).summary()
    assert summary["verdict"].startswith("FAILURE")
    assert summary["rss"]["trend_unit"] == "run"
    assert summary["rss"]["trend_kib"] == pytest.approx(30 * 1024)


def test_the_script_runs(tmp_path, capsys):
    code = soak.main(["--matvecs", "25", "--steps", "12", "--repeats", "2", "--threads", "1",
                      "--json", str(tmp_path / "soak.json")])  # fmt: skip
    output = capsys.readouterr().out
    assert code in (0, 1)
    table = [line for line in output.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 8  # header and the eight workloads
    assert (tmp_path / "soak.json").exists()
