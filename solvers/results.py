"""Frozen result records returned by the solvers.

Scalars and per-pair arrays are numpy float64. Vectors of the operator's size (eigenvectors,
diagonals) come back as numpy for numpy-path input and as torch tensors on the operator's device
for torch-path input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenpairs of a symmetric operator, ordered by the target (largest first for "LA"/"LM",
    smallest first for "SA", ascending for "BE").

    ``residuals[i]`` is ``||H v_i - lambda_i v_i||`` for unit ``v_i``. ``residuals_are_true``
    says how it was obtained: True when measured with a product of ``v_i`` (``lanczos(...,
    verify=True)``, power iteration); False when read from the Lanczos relation, which with the
    fully reorthogonalised basis equals the true residual of the products as computed up to
    rounding, at no product. ``converged[i]`` says whether it is at most ``tol *
    norm_estimate``. ``num_matvecs`` counts every product the operator saw, of which
    ``num_residual_matvecs`` went to checks outside the Krylov iteration (measured residuals,
    and the reproducibility check of an unconverged ``lanczos``); ``num_iterations`` counts
    (block) Lanczos steps or power iterations.
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    num_residual_matvecs: int
    num_iterations: int
    num_restarts: int
    tol: float
    norm_estimate: float
    residuals_are_true: bool


@dataclass(frozen=True, eq=False)
class TraceResult:
    """A trace estimate and its standard error; ``num_matvecs`` products were spent."""

    estimate: float
    stderr: float
    num_matvecs: int
    method: str


@dataclass(frozen=True, eq=False)
class DiagonalResult:
    """A diagonal estimate with an entrywise standard error (numpy or torch, like the input)."""

    estimate: Any
    stderr: Any
    num_matvecs: int
    method: str


@dataclass(frozen=True, eq=False)
class SpectralDensityResult:
    """Eigenvalue density from stochastic Lanczos quadrature.

    ``density`` is a Gaussian-smoothed (width ``sigma``) probability density on ``grid`` whose
    trapezoid integral is 1. ``nodes``/``weights`` are ``(num_runs, lanczos_steps)`` Gauss
    quadrature data, each row's weights summing to 1 (a run that found an invariant subspace
    early is padded with zero weights).
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    num_matvecs: int

    def plot(self, ax: Any = None, *, log: bool = True, **line_kwargs: Any) -> Any:
        """Draw the density (log-scaled y axis by default) on ``ax`` or a new figure."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                'SpectralDensityResult.plot needs matplotlib: pip install "torch-linop[plot]"'
            ) from error
        if ax is None:
            _, ax = plt.subplots()
        # on a log axis, clip the Gaussian tails 8 decades below the peak instead of at 1e-308
        floor = 1e-8 * float(self.density.max()) if log else -np.inf
        ax.plot(self.grid, np.maximum(self.density, floor), **line_kwargs)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax
