"""Suite ``trace``: relative error of Hutchinson, Hutch++, XTrace and Krylov-aware trace estimates
against the exact Hessian trace, at several matvec budgets and over several seeds, for ours and
each library that offers the estimator (Krylov-aware: ours only).

The model is ``mlp-small`` (a trained ~2.7k-parameter MLP): its exact trace is the sum of the
diagonal of the dense Hessian, formed from n products with unit vectors. Tables give the
root-mean-square relative error over the seeds (lower is better) and the matvecs actually spent;
the JSON keeps every estimate. Budgets are multiples of 6 (Hutch++ splits in thirds, XTrace in
halves).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks.models import make_problem
from benchmarks.peers import Unsupported, load_peers
from benchmarks.suites import RunConfig
from benchmarks.suites._dense import exact_trace_and_spectrum
from benchmarks.suites._measure import freeze_heap
from benchmarks.suites._report import SuiteResult, Table, progress, short_error

METHODS = ("hutchinson", "hutch++", "xtrace", "krylov")


def _settings(config: RunConfig) -> tuple[list[int], int]:
    if config.smoke:
        return [6, 12], 2
    return [12, 30, 60, 150], 30


def run(config: RunConfig) -> SuiteResult:
    dtype = config.dtype_or(torch.float64)
    curvature = "hessian"
    budgets, num_seeds = _settings(config)
    peers = load_peers(config.peers)
    result = SuiteResult(
        "trace",
        settings={
            "budgets": budgets,
            "seeds": num_seeds,
            "dtype": str(dtype),
            "curvature": curvature,
        },
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
        truth, spectrum = exact_trace_and_spectrum(problem, curvature)
        budgets_here = [b for b in budgets if b < problem.num_params]
        table = Table(
            f"{model_name}: {problem.description}; {problem.num_params:,} parameters, "
            f"{str(dtype).replace('torch.', '')}, {config.device.type}: Hessian trace, "
            f"RMS relative error over {num_seeds} seeds",
            [
                "method",
                "implementation",
                *[f"{b} matvecs" for b in budgets_here],
                "s / estimate",
                "note",
            ],
        )
        table.notes.append(
            f"exact trace {truth:.6g} (sum of the dense Hessian's diagonal); eigenvalues from "
            f"{spectrum[0]:.3g} to {spectrum[-1]:.3g}, {int((spectrum < 0).sum())} negative; "
            f"sum of |eigenvalues| {np.abs(spectrum).sum():.4g}"
        )
        for method in METHODS:
            for peer in peers:
                if not peer.available:
                    continue
                try:
                    estimate = peer.routine("estimate_trace")
                except Unsupported:
                    continue
                row: list[Any] = [method, peer.label]
                note = ""
                seconds: list[float] = []
                try:
                    for budget in budgets_here:
                        errors = []
                        spent = set()
                        for seed in range(config.seed, config.seed + num_seeds):
                            start = time.perf_counter()
                            outcome = estimate(problem, curvature, method, budget, seed)
                            seconds.append(time.perf_counter() - start)
                            errors.append((outcome.estimate - truth) / abs(truth))
                            spent.add(outcome.num_matvecs)
                            result.records.append(
                                {
                                    "model": model_name,
                                    "method": method,
                                    "implementation": peer.label,
                                    "budget": budget,
                                    "seed": seed,
                                    "estimate": outcome.estimate,
                                    "matvecs": outcome.num_matvecs,
                                    "exact": truth,
                                }
                            )
                        row.append(math.sqrt(float(np.mean(np.square(errors)))))
                        if spent != {budget}:
                            note += f"budget {budget}: spent {sorted(spent)}; "
                except Unsupported as reason:
                    if len(row) == 2:
                        continue  # this library has no such estimator: no row
                    note += f"not offered: {reason}"
                except Exception as error:
                    note += f"failed: {short_error(error)}"
                progress("trace", f"{model_name} {method} {peer.label}: {row[2:]}")
                row.extend([None] * (2 + len(budgets_here) - len(row)))
                row.append(float(np.median(seconds)) if seconds else None)
                row.append(note.strip("; "))
                table.rows.append(row)
        if skipped:
            table.notes.append("skipped (not importable): " + "; ".join(skipped))
        table.notes.append(
            "RMS over seeds of (estimate - exact) / |exact| (with S seeds an RMS is uncertain by "
            f"about 1/sqrt(2S) = {100 / math.sqrt(2 * num_seeds):.0f}% of itself); s / estimate: "
            "median seconds of one estimate over all budgets and seeds"
        )
        table.notes.append(
            "implementations of the same estimator differ only in their random probes "
            "(hessian-eigenthings and PyHessian draw torch.randint signs on a seeded CPU "
            "generator, ours a counter-based hash on the device), so their RMS errors differ "
            "by sampling noise"
        )
        result.tables.append(table)
    return result
