"""Small operators formed as matrices: n products against the unit vectors give the exact trace,
the exact diagonal and, through numpy's ``eigh``, every eigenvalue, where a Lanczos run or a
randomised estimate would only approximate what n products determine exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_linop.solvers import DiagonalResult, EigenResult, TraceResult
from torch_linop.solvers.eigenpairs import default_tol

PRODUCT_BLOCK = 64  # unit vectors multiplied at once


def form_matrix(operator: Any) -> np.ndarray:
    """The operator's n x n matrix in float64 (symmetrised: rounding leaves ``A - A^T`` at the
    level of the products' precision), built from n products in blocks of unit vectors."""
    size = operator.shape[0]
    columns = []
    for start in range(0, size, PRODUCT_BLOCK):
        stop = min(start + PRODUCT_BLOCK, size)
        units = torch.zeros(size, stop - start, dtype=operator.torch_dtype, device=operator.device)
        units[torch.arange(start, stop), torch.arange(stop - start)] = 1
        columns.append((operator @ units).detach().to("cpu", torch.float64).numpy())
    matrix = np.concatenate(columns, axis=1)
    return (matrix + matrix.T) / 2


def dense_eigen(matrix: np.ndarray, eps: float) -> EigenResult:
    """Every eigenpair of ``matrix``, largest |eigenvalue| first (the order of the CLI's "top"),
    with true residuals ``||A v - lambda v||``, judged against the Lanczos default tolerance."""
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(-np.abs(values), kind="stable")
    values, vectors = values[order], vectors[:, order]
    residuals = np.linalg.norm(matrix @ vectors - vectors * values, axis=0)
    norm = float(np.max(np.abs(values))) if values.size else 0.0
    tol = default_tol(eps)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        converged=residuals <= tol * max(norm, np.finfo(np.float64).tiny),
        num_matvecs=matrix.shape[0],
        num_residual_matvecs=0,
        num_iterations=0,
        num_restarts=0,
        tol=tol,
        norm_estimate=norm,
        residuals_are_true=True,
    )


def exact_trace(matrix: np.ndarray) -> TraceResult:
    """The trace of the formed matrix; its standard error is 0 by construction."""
    return TraceResult(float(np.trace(matrix)), 0.0, matrix.shape[0], "exact")


def exact_diagonal(matrix: np.ndarray) -> DiagonalResult:
    diagonal = np.diag(matrix).copy()
    return DiagonalResult(diagonal, np.zeros_like(diagonal), matrix.shape[0], "exact")
