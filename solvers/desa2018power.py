"""Deflated power iteration with De Sa et al.'s momentum, the baseline PyHessian-style method.

Momentum (De Sa, He, Mitliagkas, Re, Xu, "Accelerated Stochastic Power Iteration", AISTATS 2018,
arXiv:1707.02670) runs ``x_{t+1} = H x_t - beta x_{t-1}``; with ``beta = lambda_2**2 / 4`` the
iterations needed scale with ``1 / sqrt(gap)`` instead of ``1 / gap`` (relative gap
``1 - lambda_2 / lambda_1``), as for Chebyshev acceleration. Both iterates are divided by the same norm, so the recurrence is
unchanged by normalisation, and the reported eigenvalue is the Rayleigh quotient ``x.Hx / x.x`` of
the current iterate (not ``x.(Hx - beta x_prev)``, which is off by ``beta``-sized terms).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._operator import as_operator, non_finite_error
from ._progress import progress_bar
from ._random import draw_probes, make_generator
from ._validation import check_int, check_tol
from .eigenpairs import default_tol
from .results import EigenResult


def power_iteration(
    op: Any,
    *,
    k: int = 1,
    tol: float | None = None,
    max_iter: int = 1000,
    momentum: float = 0.0,
    seed: int | torch.Generator | None = None,
    progress: bool | None = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenpairs, one at a time, each deflated from the next.

    Each pair iterates until ``||H x - rho x|| <= tol * ||H||_est`` (``rho`` the Rayleigh
    quotient, ``||H||_est`` the largest |rho| so far) or ``max_iter`` iterations; every iteration
    is one product and one host sync. ``momentum`` is De Sa's ``beta`` in eigenvalue-squared units
    (best near ``lambda_{next}**2 / 4``; too large stalls or diverges, 0 is plain power
    iteration). Prefer :func:`lanczos`, which needs far fewer products.
    """
    operator = as_operator(op)
    n = operator.size
    check_int("k", k, 1)
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator size n={n}")
    check_int("max_iter", max_iter, 1)
    tol = default_tol(operator.eps) if tol is None else tol
    check_tol(tol)
    if not (isinstance(momentum, int | float) and math.isfinite(momentum) and momentum >= 0):
        raise ValueError(f"momentum must be a finite number >= 0, got {momentum!r}")

    generator = make_generator(seed)
    dtype, device = operator.dtype, operator.device
    found = torch.zeros(0, n, dtype=dtype, device=device)
    eigenvalues: list[float] = []
    residuals: list[float] = []
    norm_estimate, num_matvecs = 0.0, 0
    with progress_bar(f"power iteration top-{k}", k * max_iter, progress) as bar:
        for _ in range(k):
            start = draw_probes(
                1, n, generator, distribution="gaussian", dtype=dtype, device=device
            )[:, 0]
            iterate = _deflate(start, found)
            iterate /= torch.linalg.vector_norm(iterate)
            previous = torch.zeros_like(iterate)
            for _ in range(max_iter):
                product = operator.matmat(iterate[:, None])[:, 0]
                num_matvecs += 1
                bar.update(1)
                rayleigh = float(iterate @ product)
                residual = float(torch.linalg.vector_norm(product - rayleigh * iterate))
                if not (math.isfinite(rayleigh) and math.isfinite(residual)):
                    raise non_finite_error(num_matvecs)
                norm_estimate = max(norm_estimate, abs(rayleigh))
                if residual <= tol * norm_estimate:
                    break
                update = _deflate(product, found) - momentum * previous
                scale = torch.linalg.vector_norm(update)
                previous, iterate = iterate / scale, update / scale
            eigenvalues.append(rayleigh)
            residuals.append(residual)
            found = torch.cat([found, iterate[None]])

    order = np.argsort(-np.abs(eigenvalues), kind="stable")
    residual_array = np.asarray(residuals)[order]
    return EigenResult(
        eigenvalues=np.asarray(eigenvalues)[order],
        eigenvectors=operator.output(found[torch.from_numpy(order).to(device)]),
        residuals=residual_array,
        converged=residual_array <= tol * norm_estimate,
        num_matvecs=num_matvecs,
        num_residual_matvecs=0,
        num_iterations=num_matvecs,
        num_restarts=0,
        tol=tol,
        norm_estimate=norm_estimate,
        residuals_are_true=True,
    )


def _deflate(vector: Tensor, found: Tensor) -> Tensor:
    """``vector`` with its components along the found eigenvectors removed."""
    if found.shape[0] == 0:
        return vector
    return vector - found.T @ (found @ vector)
