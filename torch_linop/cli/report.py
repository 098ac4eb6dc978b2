"""The terminal report and the JSON file: the same numbers, for people and for programs."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch_linop.cli.analysis import CURVATURE_NAMES, Analysis

METHOD_NAMES = {
    "hutch++": "Hutch++",
    "hutchinson": "Hutchinson",
    "xtrace": "XTrace",
    "xdiag": "XDiag",
    "krylov": "Krylov-aware",
    "exact": "exact",
}


def spectral_mass(density: Any, band: float = 0.05) -> dict[str, float]:
    """From SLQ quadrature, averaged over the runs: the fraction of eigenvalues within ``band``
    times the largest |eigenvalue| of zero (the 'bulk') and the fraction below minus that.

    SLQ resolves the distribution only to about (spectral range) / lanczos_steps, so finer
    splits (such as "negative" versus "positive" inside the bulk) are not reported."""
    nodes = np.asarray(density.nodes, dtype=np.float64)
    weights = np.asarray(density.weights, dtype=np.float64)
    scale = float(np.max(np.abs(nodes[weights > 0]))) if np.any(weights > 0) else 0.0
    runs = max(nodes.shape[0], 1)
    near_zero = float(np.sum(weights * (np.abs(nodes) <= band * scale)) / runs)
    negative = float(np.sum(weights * (nodes < -band * scale)) / runs)
    return {
        "band": band,
        "scale": scale,
        "bulk_fraction": near_zero,
        "negative_fraction": negative,
    }


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


def format_report(analysis: Analysis, header: dict[str, str]) -> str:
    """A plain-text report: a header block, then one section per computed quantity."""
    name = CURVATURE_NAMES[analysis.curvature]
    lines = [f"torch-linop: {name} of {header['model']}"]
    width = max(len(key) for key in header)
    for key, value in header.items():
        if key != "model":
            lines.append(f"  {key.ljust(width)}  {value}")

    symbol = analysis.symbol
    eigen = analysis.eigen
    if eigen is not None:
        lines += ["", _eigen_title(analysis)]
        lines.append(f"  {'#':>3}  {'eigenvalue':>14}  {'residual':>9}  converged")
        kind = "" if eigen.residuals_are_true else " (Ritz estimate)"
        for index, (value, residual, converged) in enumerate(
            zip(eigen.eigenvalues, eigen.residuals, eigen.converged), start=1
        ):
            lines.append(
                f"  {index:>3}  {value:>14.6e}  {residual:>9.1e}  {'yes' if converged else 'NO'}"
            )
        lines.append(f"  residual = ||{symbol} v - lambda v|| for unit v{kind}")

    if analysis.trace is not None:
        estimate = analysis.trace
        lines += ["", _trace_line(estimate, analysis.num_parameters)]
        if eigen is not None and estimate.estimate > 0 and analysis.dense_size is None:
            share = float(np.sum(eigen.eigenvalues)) / estimate.estimate
            lines.append(
                f"  the top {len(eigen.eigenvalues)} eigenvalues hold {100 * share:.1f}% of it"
            )
            if not analysis.positive_semidefinite and share > 1:
                lines.append(
                    f"  (the {name} is indefinite: its negative eigenvalues lower the trace, so a "
                    "share of it can exceed 100%)"
                )

    if analysis.density is not None:
        density = analysis.density
        mass = spectral_mass(density)
        runs, steps = np.asarray(density.nodes).shape
        lines += [
            "",
            f"Spectral density (SLQ, {runs} runs x {steps} steps, {density.num_matvecs} products, "
            f"Gaussian smoothing sigma {density.sigma:.2e})",
            f"  Ritz values span [{np.min(density.nodes):.4e}, {np.max(density.nodes):.4e}]",
            f"  {100 * mass['bulk_fraction']:.1f}% of the eigenvalues lie within "
            f"{100 * mass['band']:.0f}% of max|lambda| of zero, {100 * mass['negative_fraction']:.1f}% "
            f"below -{100 * mass['band']:.0f}% of max|lambda|",
        ]

    if analysis.diagonal is not None:
        lines += ["", *_diagonal_lines(analysis)]

    for message in analysis.warnings:
        lines += ["", f"warning: {message}"]
    return "\n".join(lines)


def _eigen_title(analysis: Analysis) -> str:
    """What the eigenvalue table holds: which ones, how they were found, the tolerance."""
    eigen, name, symbol = analysis.eigen, CURVATURE_NAMES[analysis.curvature], analysis.symbol
    k = len(eigen.eigenvalues)
    order = "" if analysis.positive_semidefinite else ", largest |lambda| first"
    if analysis.dense_size is not None and eigen.num_iterations == 0:
        n = analysis.dense_size
        return (
            f"All {k} eigenvalues of the {name}{order} (dense eigh of the {n} x {n} matrix "
            f"formed with {n} products: -k is at least n)"
        )
    restarts = f", {eigen.num_restarts} restart{'s' * (eigen.num_restarts != 1)}"
    return (
        f"Top {k} eigenvalues of the {name}{order} (Lanczos, {eigen.num_matvecs} products"
        f"{restarts}, tolerance {eigen.tol:.0e} x ||{symbol}|| = {eigen.tol * eigen.norm_estimate:.1e})"
    )


def _trace_line(estimate: Any, num_parameters: int) -> str:
    if estimate.method == "exact":
        return (
            f"Trace (exact: the sum of the diagonal from all {num_parameters} unit vectors, "
            f"{estimate.num_matvecs} products): {estimate.estimate:.6e}"
        )
    return (
        f"Trace ({METHOD_NAMES.get(estimate.method, estimate.method)}, "
        f"{estimate.num_matvecs} products): "
        f"{estimate.estimate:.6e} +/- {estimate.stderr:.1e} (standard error)"
    )


def _has_negative(analysis: Analysis) -> bool:
    """Whether the run saw a negative eigenvalue (in the table or among SLQ's Ritz values)."""
    if analysis.eigen is not None and np.min(analysis.eigen.eigenvalues) < 0:
        return True
    return analysis.density is not None and float(np.min(analysis.density.nodes)) < 0


def _diagonal_lines(analysis: Analysis) -> list[str]:
    """Per tensor: the diagonal's sum with its standard error, mean and largest entry; then the
    sum over all tensors, an independent estimate of the trace."""
    result = analysis.diagonal
    exact = result.method == "exact"
    blocks = analysis.diagonal_blocks
    name_width = max(len("all tensors"), *(len(block["name"]) for block in blocks))
    how = (
        f"exact, {result.num_matvecs} products"
        if exact
        else f"{METHOD_NAMES.get(result.method, result.method)}, {result.num_matvecs} products; "
        "sum +/- its standard error"
    )
    lines = [
        f"Diagonal ({how}), per parameter tensor",
        f"  {'parameter'.ljust(name_width)}  {'size':>9}  {'sum':>11}  {'+/-':>8}  {'mean':>11}"
        f"  {'max':>11}",
    ]

    def row(label: str, size: int, total: float, stderr: float, mean: str, top: str) -> str:
        error = "exact" if exact else f"{stderr:.1e}"
        return (
            f"  {label.ljust(name_width)}  {size:>9,}  {total:>11.3e}  {error:>8}  {mean:>11}"
            f"  {top:>11}"
        ).rstrip()

    for block in blocks:
        lines.append(
            row(block["name"], block["size"], block["sum"], block["sum_stderr"],
                f"{block['mean']:.3e}", f"{block['max']:.3e}")
        )  # fmt: skip
    if analysis.diagonal_total is not None:
        total, stderr = analysis.diagonal_total
        lines.append(row("all tensors", analysis.num_parameters, total, stderr, "", ""))
        if analysis.trace is not None and not exact:
            lines.append(
                "  the sum over all tensors is a second estimate of the trace: compare it with "
                "the trace above within their standard errors"
            )
    return lines


def _array(values: Any) -> list[Any]:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values).tolist()


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def analysis_to_dict(analysis: Analysis, header: dict[str, str], meta: dict[str, Any]) -> dict:
    """Every number of the run as JSON-ready Python objects (eigenvectors are left out)."""
    record: dict[str, Any] = {
        **meta,
        "curvature": analysis.curvature,
        "description": header,
        "num_parameters": analysis.num_parameters,
        "num_data": analysis.num_data,
        "parameters": analysis.parameter_names,
        "seconds": analysis.seconds,
        "warnings": analysis.warnings,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if analysis.eigen is not None:
        eigen = analysis.eigen
        record["eigenvalues"] = {
            "which": "largest magnitude",
            "dense": analysis.dense_size is not None and eigen.num_iterations == 0,
            "values": _array(eigen.eigenvalues),
            "residuals": _array(eigen.residuals),
            "residuals_are_true": bool(eigen.residuals_are_true),
            "converged": [bool(flag) for flag in eigen.converged],
            "tol": eigen.tol,
            "norm_estimate": eigen.norm_estimate,
            "num_matvecs": eigen.num_matvecs,
            "num_iterations": eigen.num_iterations,
            "num_restarts": eigen.num_restarts,
        }
    if analysis.trace is not None:
        record["trace"] = {
            "estimate": _finite(analysis.trace.estimate),
            "stderr": _finite(analysis.trace.stderr),
            "method": analysis.trace.method,
            "num_matvecs": analysis.trace.num_matvecs,
        }
    if analysis.density is not None:
        density = analysis.density
        record["spectral_density"] = {
            "grid": _array(density.grid),
            "density": _array(density.density),
            "sigma": density.sigma,
            "nodes": _array(density.nodes),
            "weights": _array(density.weights),
            "num_matvecs": density.num_matvecs,
            **spectral_mass(density),
        }
    if analysis.diagonal is not None:
        record["diagonal"] = {
            "method": analysis.diagonal.method,
            "num_matvecs": analysis.diagonal.num_matvecs,
            "blocks": analysis.diagonal_blocks,
            "total": None
            if analysis.diagonal_total is None
            else {"sum": analysis.diagonal_total[0], "stderr": analysis.diagonal_total[1]},
        }
    return record


def write_json(record: dict, path: Path) -> Path:
    path = path.expanduser().resolve()  # checked writable before the run (preflight)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
