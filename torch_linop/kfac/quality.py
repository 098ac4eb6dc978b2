"""How good is a Kronecker approximation? Matrix-free comparisons with the exact operator.

``approximation_quality(approx, exact)`` measures, with products only:

- the relative Frobenius error ``||K - G||_F / ||G||_F`` by Hutchinson (``E ||M z||^2 =
  ||M||_F^2`` for Rademacher ``z``; the same probes for both norms), with a delta-method
  standard error;
- the overlap of the top-``k`` eigenspaces, ``||V_K^T V_G||_F^2 / k`` in ``[0, 1]`` (Lanczos
  on both operators);
- the trace ratio ``tr(K) / tr(G)``: ``tr(K)`` exact from the factors where the operator has
  ``trace()``, ``tr(G)`` by Hutchinson on the same probes (with its standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from torch_linop.solvers import lanczos


@dataclass(frozen=True)
class ApproximationQuality:
    """What :func:`approximation_quality` measured (estimates with standard errors)."""

    relative_frobenius_error: float
    relative_frobenius_error_stderr: float
    top_k_overlap: float | None
    k: int
    trace_ratio: float
    trace_ratio_stderr: float
    num_probes: int


def _products(operator: Any, columns: torch.Tensor) -> torch.Tensor:
    device = getattr(operator, "device", columns.device)
    dtype = getattr(operator, "torch_dtype", columns.dtype)
    return (operator @ columns.to(device, dtype)).to(columns.device, torch.float64)


def approximation_quality(
    approx: Any,
    exact: Any,
    *,
    num_probes: int = 32,
    k: int = 5,
    seed: int = 0,
    lanczos_tol: float | None = None,
) -> ApproximationQuality:
    """Compare ``approx`` (KFAC, EKFAC, any symmetric operator) with ``exact`` (the GGN or
    Fisher it approximates); both must act on the same parameter vector. ``k=0`` skips the
    eigenspace overlap (two Lanczos runs, the costly part)."""
    if approx.shape != exact.shape:
        raise ValueError(
            f"the operators have shapes {approx.shape} and {exact.shape}; build both over the "
            "same parameters (KFAC keeps only the parameters of supported layers: see its "
            "param_names)"
        )
    if num_probes < 2:
        raise ValueError(f"num_probes must be at least 2 for an error bar, got {num_probes}")
    size = approx.shape[0]
    generator = torch.Generator().manual_seed(seed)
    probes = torch.randint(0, 2, (size, num_probes), generator=generator).double() * 2 - 1
    exact_products = _products(exact, probes)
    difference = _products(approx, probes) - exact_products
    error_samples = difference.square().sum(0)
    norm_samples = exact_products.square().sum(0)
    error_mean, norm_mean = float(error_samples.mean()), float(norm_samples.mean())
    ratio = error_mean / norm_mean
    relative_error = math.sqrt(ratio)
    error_stderr = 0.0
    if error_mean > 0:
        covariance = torch.cov(torch.stack([error_samples, norm_samples])) / num_probes
        ratio_variance = ratio**2 * (
            float(covariance[0, 0]) / error_mean**2
            + float(covariance[1, 1]) / norm_mean**2
            - 2 * float(covariance[0, 1]) / (error_mean * norm_mean)
        )
        error_stderr = math.sqrt(max(ratio_variance, 0.0)) / (2 * relative_error)

    trace_samples = (probes * exact_products).sum(0)
    exact_trace = float(trace_samples.mean())
    exact_trace_stderr = float(trace_samples.std()) / math.sqrt(num_probes)
    if hasattr(approx, "trace") and callable(approx.trace):
        approx_trace = float(approx.trace())
    else:
        approx_trace = float((probes * _products(approx, probes)).sum(0).mean())
    trace_ratio = approx_trace / exact_trace
    trace_ratio_stderr = abs(trace_ratio) * exact_trace_stderr / abs(exact_trace)

    overlap = None
    if k > 0:
        vectors = []
        for operator in (approx, exact):
            result = lanczos(operator, k=k, which="LA", seed=seed, tol=lanczos_tol)
            # (k, n) rows: the Ritz vectors
            vectors.append(torch.as_tensor(result.eigenvectors).to("cpu", torch.float64))
        overlap = float((vectors[0] @ vectors[1].T).square().sum()) / k
    return ApproximationQuality(
        relative_error, error_stderr, overlap, k, trace_ratio, trace_ratio_stderr, num_probes
    )
