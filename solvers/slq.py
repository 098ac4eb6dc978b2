"""Eigenvalue density by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen and Saad, "Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature", SIAM J.
Matrix Anal. Appl. 38(4), 2017; as used for Hessians by Ghorbani, Krishnan and Xiao (2019) and
PyHessian. For a Rademacher start ``z``, ``m`` Lanczos steps give ``T = Y diag(theta) Y^T`` and
``z^T f(H) z / n ~ sum_j Y[0, j]**2 f(theta_j)``: Gauss quadrature with nodes ``theta`` and
weights ``Y[0, :]**2`` (summing to 1) of the spectral measure seen from ``z``. Averaging runs and
smoothing each node with a Gaussian gives a density of eigenvalues that integrates to 1.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import numpy as np
import scipy.integrate
import scipy.linalg
import torch

from . import krylov
from ._memory import device_budget, vectors_within
from ._operator import Operator, as_operator
from ._progress import progress_bar
from ._random import make_generator
from ._validation import as_device, check_int
from .checkpoint import Checkpoint, seed_option
from .results import SpectralDensityResult


def check_density_options(
    n: int, num_runs: Any, lanczos_steps: Any, grid_size: Any, sigma: Any
) -> None:
    """The options of an SLQ density over an ``n x n`` operator (single-process or sharded)."""
    check_int("num_runs", num_runs, 1)
    check_int("lanczos_steps", lanczos_steps, 1)
    if lanczos_steps > n:
        raise ValueError(
            f"lanczos_steps={lanczos_steps} exceeds the operator size n={n}; use at most n steps "
            "(n steps give the exact spectrum)"
        )
    check_int("grid_size", grid_size, 2)
    if sigma is not None and not (
        isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0
    ):
        raise ValueError(f"sigma must be None (automatic) or a positive number, got {sigma!r}")


def spectral_density(
    op: Any,
    *,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int | torch.Generator | None = None,
    basis_device: str | torch.device | None = None,
    basis_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
) -> SpectralDensityResult:
    """SLQ density of the eigenvalues of symmetric ``op`` (``num_runs * lanczos_steps`` products).

    Each run uses full reorthogonalisation, so nodes are not duplicated by lost orthogonality;
    runs go one after another in the same basis buffer (one Krylov basis alive at a time). A run
    whose Krylov space becomes invariant stops early: its quadrature is then exact. ``sigma``
    (default: the node range / ``lanczos_steps``) is the Gaussian smoothing width; the grid spans
    the nodes plus ``5 sigma`` on each side.

    ``checkpoint`` / ``checkpoint_every`` / ``checkpoint_seconds``: resumable runs, as for
    :func:`lanczos` (bit-identical results after a resume).
    """
    operator = as_operator(op)
    n = operator.size
    check_density_options(n, num_runs, lanczos_steps, grid_size, sigma)

    generator = make_generator(operator.space.shared_seed(seed))
    options = {
        "num_runs": num_runs,
        "lanczos_steps": lanczos_steps,
        "grid_size": grid_size,
        "sigma": sigma,
        "seed": seed_option(seed),
    }

    def saver_for(recurrence_options: dict[str, Any]) -> Checkpoint:
        return Checkpoint(
            checkpoint,
            solver="spectral_density",
            options={**options, **recurrence_options},
            op=op,
            operator=operator,
            every_matvecs=checkpoint_every,
            every_seconds=checkpoint_seconds,
        )

    if basis_device is None and basis_dtype is None and _basis_too_big(operator, lanczos_steps):
        warnings.warn(
            f"spectral_density: a {lanczos_steps + 1}-vector basis does not fit in free device "
            "memory, so runs use the three-term recurrence with local reorthogonalisation "
            "(quadrature stays accurate; extreme nodes may repeat). Pass basis_device='cpu' or "
            "basis_dtype to keep full reorthogonalisation.",
            RuntimeWarning,
            stacklevel=2,
        )
        saver = saver_for({"recurrence": "three-term"})
        return _local_spectral_density(
            operator, num_runs, lanczos_steps, grid_size, sigma, generator, progress, saver
        )
    basis_device = (
        operator.device if basis_device is None else as_device("basis_device", basis_device)
    )
    basis_dtype = operator.dtype if basis_dtype is None else basis_dtype
    acc_dtype = krylov.accumulation_dtype(basis_dtype, operator.dtype)
    saver = saver_for({"basis_dtype": basis_dtype})
    saved = saver.load()
    nodes = np.zeros((num_runs, lanczos_steps))
    weights = np.zeros((num_runs, lanczos_steps))
    state: krylov.KrylovState | None = None
    first_run, run_started = 0, False
    if saved is not None:  # the same buffers, counters and generator state, then go on
        state = krylov.allocate(
            operator,
            n,
            1,
            capacity=min(n, lanczos_steps + 1),
            generator=generator,
            basis_device=basis_device,
            basis_dtype=basis_dtype,
        )
        krylov.load_state_dict(state, saved["krylov"])
        nodes[:], weights[:] = saved["nodes"].numpy(), saved["weights"].numpy()
        first_run, run_started = int(saved["run"]), bool(saved["run_started"])

    def save_point(current: krylov.KrylovState, run: int, started: bool) -> None:
        saver.maybe_save(
            current.num_matvecs,
            lambda: {
                "krylov": krylov.state_dict(current),
                "nodes": nodes,
                "weights": weights,
                "run": run,
                "run_started": started,
            },
        )

    total = num_runs * lanczos_steps
    with progress_bar("spectral density (SLQ)", total, progress) as bar:
        bar.update(0 if state is None else state.num_matvecs)  # products of a resumed run
        for run in range(first_run, num_runs):
            if not run_started:
                start = operator.probes(
                    1, generator, "rademacher", dtype=acc_dtype, device=basis_device
                )
                if state is None:
                    state = krylov.start(
                        operator,
                        start,
                        capacity=min(n, lanczos_steps + 1),
                        generator=generator,
                        basis_device=basis_device,
                        basis_dtype=basis_dtype,
                    )
                else:
                    krylov.reset(state, start)
            run_started = False
            assert state is not None
            while state.num_multiplied < lanczos_steps and krylov.can_step(state):
                krylov.step(state, operator)
                bar.update(1)
                save_point(state, run, True)
            # On a breakdown the rolled-back state holds the invariant subspace: exact quadrature.
            krylov.validate(state)
            run_nodes, run_weights = _quadrature(state)
            nodes[run, : len(run_nodes)] = run_nodes
            nodes[run, len(run_nodes) :] = run_nodes[-1]
            weights[run, : len(run_weights)] = run_weights
            save_point(state, run + 1, False)
    assert state is not None
    grid, density, sigma = _smoothed_density(nodes, weights, grid_size, sigma, lanczos_steps)
    return SpectralDensityResult(grid, density, nodes, weights, sigma, state.num_matvecs)


def _basis_too_big(operator: Any, lanczos_steps: int) -> bool:
    cap = vectors_within(device_budget(operator.device), operator.length, operator.dtype)
    cap = operator.space.agreed_min(cap)
    return cap is not None and cap < min(operator.size, lanczos_steps + 1)


def _local_spectral_density(
    operator: Operator,
    num_runs: int,
    lanczos_steps: int,
    grid_size: int,
    sigma: float | None,
    generator: torch.Generator,
    progress: bool | None,
    saver: Checkpoint,
) -> SpectralDensityResult:
    """SLQ with the three-term recurrence (three vectors alive), for operators whose full basis
    does not fit: Lanczos quadrature is accurate without global orthogonality (Greenbaum 1989;
    Knizhnerman 1996), at the price of repeated copies of converged extreme nodes. Checkpoints
    hold the two current vectors, the coefficients so far and the generator's state."""
    space = operator.space
    acc = torch.float64 if operator.dtype == torch.float64 else torch.float32
    nodes = np.zeros((num_runs, lanczos_steps))
    weights = np.zeros((num_runs, lanczos_steps))
    num_matvecs, first_run = 0, 0
    resumed: dict[str, Any] | None = None
    saved = saver.load()
    if saved is not None:
        nodes[:], weights[:] = saved["nodes"].numpy(), saved["weights"].numpy()
        num_matvecs, first_run = int(saved["num_matvecs"]), int(saved["run"])
        generator.set_state(saved["generator"])
        resumed = saved.get("in_run")

    def run_state(run: int, in_run: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "nodes": nodes,
            "weights": weights,
            "num_matvecs": num_matvecs,
            "run": run,
            "generator": generator.get_state(),
            "in_run": in_run,
        }

    total = num_runs * lanczos_steps
    with progress_bar("spectral density (SLQ, local)", total, progress) as bar:
        bar.update(num_matvecs)
        for run in range(first_run, num_runs):
            if resumed is not None:
                vector = resumed["vector"].to(operator.device, acc)
                previous = resumed["previous"].to(operator.device, acc)
                alphas = [float(a) for a in resumed["alphas"]]
                betas = [float(b) for b in resumed["betas"]]
                beta = float(resumed["beta"])
                resumed = None
            else:
                start = operator.probes(1, generator, "rademacher", dtype=acc)[:, 0]
                vector = start / space.vector_norm(start)
                previous = torch.zeros_like(vector)
                alphas, betas, beta = [], [], 0.0
            while True:
                product = operator.matmat(vector[:, None].to(operator.dtype))[:, 0].to(acc)
                num_matvecs += 1
                bar.update(1)
                alpha = float(space.inner(vector[:, None], product[:, None])[0, 0])
                product -= alpha * vector + beta * previous
                for basis_vector in (vector, previous):  # local reorthogonalisation
                    product -= (
                        space.inner(basis_vector[:, None], product[:, None])[0] * basis_vector
                    )
                alphas.append(alpha)
                beta = float(space.vector_norm(product))
                if not math.isfinite(beta):
                    raise FloatingPointError(f"non-finite Lanczos step at product {num_matvecs}")
                if beta <= 1e-12 * max(abs(a) for a in alphas) or len(alphas) == lanczos_steps:
                    break
                betas.append(beta)
                previous, vector = vector, product.div_(beta)
                del product
                in_run = {
                    "vector": vector,
                    "previous": previous,
                    "alphas": np.array(alphas),
                    "betas": np.array(betas),
                    "beta": beta,
                }
                saver.maybe_save(num_matvecs, functools.partial(run_state, run, in_run))
            values, vectors = scipy.linalg.eigh_tridiagonal(
                np.array(alphas), np.array(betas[: len(alphas) - 1])
            )
            run_weights = vectors[0] ** 2
            nodes[run, : len(values)] = values
            nodes[run, len(values) :] = values[-1]
            weights[run, : len(values)] = run_weights / run_weights.sum()
            saver.maybe_save(num_matvecs, functools.partial(run_state, run + 1, None))
    grid, density, sigma = _smoothed_density(nodes, weights, grid_size, sigma, lanczos_steps)
    return SpectralDensityResult(grid, density, nodes, weights, sigma, num_matvecs)


def _quadrature(state: krylov.KrylovState) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (Ritz values) and weights (squared first components) of the run in ``state``."""
    values, coordinates, _ = krylov.ritz(state)
    run_weights = coordinates[0] ** 2
    return values, run_weights / run_weights.sum()


def _smoothed_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    grid_size: int,
    sigma: float | None,
    lanczos_steps: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-smoothed mixture of the runs' quadratures on a grid, normalised to integrate to 1
    (trapezoid rule) so that grid discretisation does not leak mass."""
    used = weights > 0
    low, high = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        spread, magnitude = high - low, max(abs(low), abs(high))
        # nodes that differ by rounding only are one point: a width of spread / steps there
        # would be below the float resolution at their magnitude (a grid of equal points)
        if spread > 1000 * np.finfo(np.float64).eps * magnitude:
            sigma = spread / lanczos_steps
        else:
            sigma = 1e-3 * magnitude if magnitude > 0 else 1e-3
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, grid_size)
    density = np.zeros(grid_size)
    for run_nodes, run_weights in zip(nodes, weights, strict=True):
        offsets = (grid[:, None] - run_nodes[None, :]) / sigma
        density += np.exp(-0.5 * offsets**2) @ run_weights
    density /= scipy.integrate.trapezoid(density, grid)
    return grid, density, float(sigma)
