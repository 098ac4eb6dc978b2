"""curvlinops' spectral densities (Papyan 2020) on top of our stochastic Lanczos quadrature.

Lanczos runs come from :func:`torch_linop.solvers.spectral_density` (full reorthogonalisation,
Rademacher starts); this module only turns their nodes and weights into curvlinops' output: a
Gaussian mixture on a ``num_points`` grid over the (padded) spectral boundaries, with kernel
width ``2 / (ncv - 1) / sqrt(8 log kappa)`` in normalised coordinates. Boundaries come from our
Lanczos eigensolver.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy.sparse.linalg import aslinearoperator, eigsh

from torch_linop.curvlinops._estimation import TorchOperand, is_numpy_path, resolve_seed
from torch_linop.solvers import lanczos, spectral_density

Boundaries = tuple[float | None, float | None] | None


def solver_operand(A: Any) -> Any:
    """What our solvers take for ``A``: scipy operators as they are, anything else in torch."""
    return A if is_numpy_path(A) else TorchOperand(A)


def _extreme(A: Any, which: Literal["LM", "LA", "SA", "BE"], tol: float) -> np.ndarray:
    result = lanczos(
        solver_operand(A),
        2 if which == "BE" else 1,
        which=which,
        tol=tol,
        return_eigenvectors=False,
        seed=resolve_seed(None),
    )
    return np.sort(result.eigenvalues)


def approximate_boundaries(
    A: Any, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    """Smallest and largest eigenvalue (those given in ``boundaries`` are kept)."""
    low, high = (None, None) if boundaries is None else boundaries
    if low is None and high is None:
        both = _extreme(A, "BE", tol)
        return float(both[0]), float(both[-1])
    if low is None:
        low = float(_extreme(A, "SA", tol)[0])
    if high is None:
        high = float(_extreme(A, "LA", tol)[0])
    return float(low), float(high)


def approximate_boundaries_abs(
    A: Any, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    """Smallest and largest eigenvalue magnitude. The smallest magnitude (an interior eigenvalue
    for indefinite matrices) uses scipy's ``eigsh(which="SM")``, as curvlinops does."""
    low, high = (None, None) if boundaries is None else boundaries
    if high is None:
        high = float(_extreme(A, "LM", tol)[0])
    if low is None:
        scipy_view = (
            A.to_scipy()
            if hasattr(A, "to_scipy")
            else aslinearoperator(A.detach().cpu().numpy() if isinstance(A, torch.Tensor) else A)
        )
        (low,) = eigsh(scipy_view, k=1, which="SM", tol=tol, return_eigenvectors=False)
    return abs(float(low)), abs(float(high))


def _kernel_width(ncv: int, kappa: float) -> float:
    return 2 / (ncv - 1) / math.sqrt(8 * math.log(kappa))


def _mixture(
    centres: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float
) -> np.ndarray:
    """``sum_j w_j N(grid; c_j, sigma)`` averaged over the rows (runs) of ``centres``/``weights``."""
    offsets = (grid[None, None, :] - centres[:, :, None]) / sigma
    kernel = np.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2 * math.pi))
    return (weights[:, :, None] * kernel).sum(1).mean(0)


def _density(
    nodes: np.ndarray,
    weights: np.ndarray,
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    ncv: int,
) -> tuple[np.ndarray, np.ndarray]:
    low, high = boundaries
    padding = margin * (high - low)
    low, high = low - padding, high + padding
    centre, half_width = (high + low) / 2, (high - low) / 2
    grid = np.linspace(-1, 1, num_points)
    density = _mixture((nodes - centre) / half_width, weights, grid, _kernel_width(ncv, kappa))
    return np.linspace(low, high, num_points), density / half_width


def _log_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: float,
    ncv: int,
) -> tuple[np.ndarray, np.ndarray]:
    low, high = (math.log(boundary + epsilon) for boundary in boundaries)
    padding = margin * (high - low)
    low, high = low - padding, high + padding
    centre, half_width = (high + low) / 2, (high - low) / 2
    grid = np.linspace(-1, 1, num_points)
    grid_out = np.exp(grid * half_width + centre)
    log_nodes = np.log(np.abs(nodes) + epsilon)
    density = _mixture((log_nodes - centre) / half_width, weights, grid, _kernel_width(ncv, kappa))
    return grid_out, density / (half_width * grid_out)


class _LanczosRuns:
    """Quadrature nodes and weights of ``ncv``-step Lanczos runs, drawn on demand and cached."""

    def __init__(self, A: Any, ncv: int) -> None:
        if not isinstance(ncv, int) or ncv < 2:
            raise ValueError(f"ncv must be an int >= 2 (Lanczos steps), got {ncv!r}")
        self._A = A
        self._ncv = ncv
        self._nodes = np.zeros((0, ncv))
        self._weights = np.zeros((0, ncv))

    def runs(self, num_repeats: int) -> tuple[np.ndarray, np.ndarray]:
        missing = num_repeats - self._nodes.shape[0]
        if missing > 0:
            result = spectral_density(
                solver_operand(self._A),
                num_runs=missing,
                lanczos_steps=self._ncv,
                grid_size=2,
                seed=resolve_seed(None),
            )
            self._nodes = np.concatenate([self._nodes, result.nodes])
            self._weights = np.concatenate([self._weights, result.weights])
        return self._nodes[:num_repeats], self._weights[:num_repeats]

    def output(self, grid: np.ndarray, density: np.ndarray) -> tuple[Any, Any]:
        """numpy for numpy-path operators (curvlinops 2.x), torch tensors otherwise (3.x)."""
        if is_numpy_path(self._A):
            return grid, density
        operand = TorchOperand(self._A)
        return operand.result(torch.as_tensor(grid)), operand.result(torch.as_tensor(density))


def lanczos_approximate_spectrum(
    A: Any,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 3.0,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
) -> tuple[Any, Any]:
    """Spectral density of symmetric ``A`` from ``num_repeats`` Lanczos runs of ``ncv`` steps."""
    return LanczosApproximateSpectrumCached(
        A, ncv, boundaries, boundaries_tol
    ).approximate_spectrum(num_repeats, num_points, kappa, margin)


def lanczos_approximate_log_spectrum(
    A: Any,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 1.04,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    epsilon: float = 1e-5,
) -> tuple[Any, Any]:
    """Density of ``|eigenvalue|`` on a logarithmic grid (for spectra spanning magnitudes)."""
    cached = LanczosApproximateLogSpectrumCached(A, ncv, boundaries, boundaries_tol)
    return cached.approximate_log_spectrum(num_repeats, num_points, kappa, margin, epsilon)


class LanczosApproximateSpectrumCached(_LanczosRuns):
    """:func:`lanczos_approximate_spectrum` that keeps its Lanczos runs between calls."""

    def __init__(
        self, A: Any, ncv: int, boundaries: Boundaries = None, boundaries_tol: float = 1e-2
    ) -> None:
        super().__init__(A, ncv)
        self._boundaries = approximate_boundaries(A, tol=boundaries_tol, boundaries=boundaries)

    def approximate_spectrum(
        self, num_repeats: int = 1, num_points: int = 1024, kappa: float = 3.0, margin: float = 0.05
    ) -> tuple[Any, Any]:
        nodes, weights = self.runs(num_repeats)
        return self.output(
            *_density(nodes, weights, self._boundaries, num_points, kappa, margin, self._ncv)
        )


class LanczosApproximateLogSpectrumCached(_LanczosRuns):
    """:func:`lanczos_approximate_log_spectrum` that keeps its Lanczos runs between calls."""

    def __init__(
        self, A: Any, ncv: int, boundaries: Boundaries = None, boundaries_tol: float = 1e-2
    ) -> None:
        super().__init__(A, ncv)
        self._boundaries = approximate_boundaries_abs(A, tol=boundaries_tol, boundaries=boundaries)

    def approximate_log_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> tuple[Any, Any]:
        nodes, weights = self.runs(num_repeats)
        return self.output(
            *_log_density(
                nodes, weights, self._boundaries, num_points, kappa, margin, epsilon, self._ncv
            )
        )
