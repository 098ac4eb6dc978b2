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
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._operator import as_operator, non_finite_error
from ._progress import progress_bar
from ._random import make_generator
from ._space import Space
from ._validation import check_int, check_tol
from .checkpoint import Checkpoint, seed_option
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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenpairs, one at a time, each deflated from the next.

    Each pair iterates until ``||H x - rho x|| <= tol * ||H||_est`` (``rho`` the Rayleigh
    quotient, ``||H||_est`` the largest |rho| so far) or ``max_iter`` iterations; every iteration
    is one product and one host sync. ``momentum`` is De Sa's ``beta`` in eigenvalue-squared units
    (best near ``lambda_{next}**2 / 4``; too large stalls or diverges, 0 is plain power
    iteration). Prefer :func:`lanczos`, which needs far fewer products. An unconverged pair is
    reported with the iterate whose residual was measured last.

    ``checkpoint`` / ``checkpoint_every`` / ``checkpoint_seconds``: resumable runs, as for
    :func:`lanczos` (bit-identical results after a resume).
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

    space = operator.space
    generator = make_generator(space.shared_seed(seed))
    saver = Checkpoint(
        checkpoint,
        solver="power_iteration",
        options={
            "k": k,
            "tol": tol,
            "max_iter": max_iter,
            "momentum": momentum,
            "seed": seed_option(seed),
        },
        op=op,
        operator=operator,
        every_matvecs=checkpoint_every,
        every_seconds=checkpoint_seconds,
    )
    dtype, device = operator.dtype, operator.device
    # the whole state of the run; iterate is None between pairs
    run: dict[str, Any] = {
        "found": torch.zeros(0, operator.length, dtype=dtype, device=device),
        "eigenvalues": [],
        "residuals": [],
        "norm_estimate": 0.0,
        "num_matvecs": 0,
        "iterate": None,
        "previous": None,
        "iteration": 0,
    }
    saved = saver.load()
    if saved is not None:
        generator.set_state(saved.pop("generator"))
        run.update(
            {
                name: value.to(device) if isinstance(value, Tensor) else value
                for name, value in saved.items()
            }
        )

    def state() -> dict[str, Any]:
        return {**run, "generator": generator.get_state()}

    with progress_bar(f"power iteration top-{k}", k * max_iter, progress) as bar:
        bar.update(run["num_matvecs"])  # products of a resumed run
        while len(run["eigenvalues"]) < k:
            found = run["found"]
            if run["iterate"] is None:
                start = operator.probes(1, generator, "gaussian")[:, 0]
                iterate = _deflate(space, start, found)
                run["iterate"] = iterate / space.vector_norm(iterate)
                run["previous"] = torch.zeros_like(iterate)
                run["iteration"] = 0
            while True:
                saver.maybe_save(run["num_matvecs"], state)
                iterate = run["iterate"]
                product = operator.matmat(iterate[:, None])[:, 0]
                run["num_matvecs"] += 1
                run["iteration"] += 1
                bar.update(1)
                rayleigh = float(space.inner(iterate[:, None], product[:, None])[0, 0])
                residual = float(space.vector_norm(product - rayleigh * iterate))
                if not (math.isfinite(rayleigh) and math.isfinite(residual)):
                    raise non_finite_error(run["num_matvecs"])
                run["norm_estimate"] = max(run["norm_estimate"], abs(rayleigh))
                if residual <= tol * run["norm_estimate"] or run["iteration"] >= max_iter:
                    break
                update = _deflate(space, product, found) - momentum * run["previous"]
                scale = space.vector_norm(update)
                run["previous"], run["iterate"] = iterate / scale, update / scale
            run["eigenvalues"].append(rayleigh)
            run["residuals"].append(residual)
            run["found"] = torch.cat([found, iterate[None]])
            run["iterate"] = run["previous"] = None

    eigenvalues, residuals = run["eigenvalues"], run["residuals"]
    norm_estimate, num_matvecs, found = run["norm_estimate"], run["num_matvecs"], run["found"]
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


def _deflate(space: Space, vector: Tensor, found: Tensor) -> Tensor:
    """``vector`` with its components along the found eigenvectors (rows) removed."""
    if found.shape[0] == 0:
        return vector
    return vector - found.T @ space.inner(found.T, vector[:, None])[:, 0]
