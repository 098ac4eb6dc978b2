"""Suite ``slq``: spectral densities by stochastic Lanczos quadrature, ours and each library's,
with the same number of runs and Lanczos steps, against the exact spectrum.

Agreement is the 1-Wasserstein distance (scipy ``wasserstein_distance``) between a method's
spectral measure and the exact one (all n eigenvalues, weight 1/n each), divided by the spectral
width so it reads as a fraction of the spectrum: from the quadrature nodes and weights where the
library returns them, else from its smoothed density on its grid (which adds the smoothing width
to the distance). Also the distance to ours, the matvecs and the seconds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from benchmarks.models import make_problem
from benchmarks.peers import DensityOutcome, Unsupported, load_peers
from benchmarks.suites import RunConfig
from benchmarks.suites._dense import exact_trace_and_spectrum
from benchmarks.suites._measure import freeze_heap
from benchmarks.suites._report import SuiteResult, Table, progress, short_error

COLUMNS = [
    "implementation",
    "matvecs",
    "seconds",
    "W1 to exact / width",
    "W1 to ours / width",
    "measure from",
    "note",
]


def _measure_of(outcome: DensityOutcome) -> tuple[np.ndarray, np.ndarray, str]:
    """(support, weights) of the method's spectral measure, preferring quadrature nodes."""
    if outcome.nodes is not None and outcome.weights is not None and outcome.nodes.size:
        keep = outcome.weights > 0
        return outcome.nodes[keep], outcome.weights[keep], "quadrature nodes"
    if outcome.grid is None or outcome.density is None:
        raise ValueError("the outcome holds neither nodes nor a density")
    weights = np.clip(outcome.density, 0.0, None)
    return outcome.grid, weights / weights.sum(), "smoothed density on its grid"


def run(config: RunConfig) -> SuiteResult:
    dtype = config.dtype_or(torch.float64)
    curvature = "hessian"
    num_runs, steps = (2, 12) if config.smoke else (10, 80)
    peers = load_peers(config.peers)
    result = SuiteResult(
        "slq",
        settings={"num_runs": num_runs, "lanczos_steps": steps, "dtype": str(dtype)},
    )
    skipped = [f"{peer.label}: {peer.missing}" for peer in peers if not peer.available]
    for model_name in config.models or ["mlp-small"]:
        problem = make_problem(
            model_name,
            config.tier,
            device=config.device,
            dtype=dtype,
            seed=config.seed,
            batch_size=config.batch_size,
        )
        freeze_heap()
        _, spectrum = exact_trace_and_spectrum(problem, curvature)
        width = float(spectrum[-1] - spectrum[0])
        uniform = np.full(spectrum.size, 1.0 / spectrum.size)
        table = Table(
            f"{model_name}: {problem.description}; {problem.num_params:,} parameters, "
            f"{str(dtype).replace('torch.', '')}, {config.device.type}: Hessian spectral "
            f"density, {num_runs} runs x {steps} Lanczos steps",
            COLUMNS,
        )
        ours_measure: tuple[np.ndarray, np.ndarray] | None = None
        for peer in peers:
            if not peer.available:
                continue
            try:
                density = peer.routine("spectral_density")
            except Unsupported:
                continue
            try:
                start = time.perf_counter()
                outcome = density(problem, curvature, num_runs, steps, config.seed)
                seconds = time.perf_counter() - start
            except Unsupported as reason:
                table.rows.append(
                    [peer.label, None, None, None, None, None, f"not offered: {reason}"]
                )
                continue
            except Exception as error:
                table.rows.append(
                    [peer.label, None, None, None, None, None, f"failed: {short_error(error)}"]
                )
                continue
            progress(
                "slq", f"{model_name} {peer.label}: {outcome.num_matvecs} matvecs, {seconds:.3g} s"
            )
            support, weights, source = _measure_of(outcome)
            to_exact = wasserstein_distance(support, spectrum, weights, uniform) / width
            to_ours = None
            if peer.name == "ours":
                ours_measure = (support, weights)
            elif ours_measure is not None:
                to_ours = (
                    wasserstein_distance(support, ours_measure[0], weights, ours_measure[1]) / width
                )
            table.rows.append(
                [peer.label, outcome.num_matvecs, seconds, to_exact, to_ours, source, outcome.note]
            )
            record: dict[str, Any] = {
                "model": model_name,
                "implementation": peer.label,
                "matvecs": outcome.num_matvecs,
                "seconds": seconds,
                "w1_to_exact_over_width": to_exact,
                "w1_to_ours_over_width": to_ours,
                "measure_from": source,
            }
            if outcome.nodes is not None:
                record["nodes"], record["weights"] = outcome.nodes, outcome.weights
            result.records.append(record)
        table.notes.append(
            f"exact spectrum from the dense Hessian: {spectrum.size} eigenvalues in "
            f"[{spectrum[0]:.4g}, {spectrum[-1]:.4g}] (width {width:.4g})"
        )
        if skipped:
            table.notes.append("skipped (not importable): " + "; ".join(skipped))
        result.tables.append(table)
    return result
