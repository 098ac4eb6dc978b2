"""The planner's prediction against the measured peak RSS of the same product on CPU (issue 21:
within 15%). One tiny Llama whose product workspace (~180 MB) dominates the RSS noise; each
measurement runs in a fresh subprocess (benchmarks/planner_rss.py, which prints the full table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.planner_rss import measure, predict  # noqa: E402

TOLERANCE = 0.15  # the goal; measured: -0.6 to -6.7% (docs/howto/llm_scale.md)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_prediction_within_15_percent_of_measured_peak_rss(curvature: str) -> None:
    predicted = predict("h128-L2-V4000", curvature)
    measured = measure("h128-L2-V4000", curvature)
    assert measured > 100 * 2**20  # the workspace dominates: the comparison means something
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)
