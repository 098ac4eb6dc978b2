"""Hutchinson's estimators of the trace and the diagonal.

Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
splines", Communications in Statistics - Simulation and Computation, 1989: for probes ``z`` with
``E[z z^T] = I``, ``E[z^T H z] = tr(H)`` and ``E[z * (H z)] = diag(H)`` (Bekas, Kokiopoulou and
Saad, 2007, for the diagonal). Probes are streamed in blocks, so memory stays at one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._memory import default_block_size
from ._operator import Operator
from ._random import Distribution
from ._sampling import EstimatorState, accumulate, apply, mean_and_stderr

MIN_MATVECS = 1  # one probe gives an (unbiased) estimate; its standard error is NaN


def mean_and_stderr_or_nan(state: EstimatorState) -> tuple[Tensor, Tensor]:
    """The sample mean and its standard error; with a single sample the error is unknown: NaN
    (an estimate from one probe is still a valid, unbiased estimate)."""
    if state.num_samples == 1 and state.mean is not None:
        return state.mean, torch.full_like(state.mean, float("nan"))
    return mean_and_stderr(state)


def hutchinson_samples(
    operator: Operator,
    num_probes: int,
    state: EstimatorState,
    *,
    diagonal: bool,
    distribution: Distribution,
    block_size: int | None,
    bar: Any,
    project: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Accumulate ``num_probes`` samples ``z^T H z`` (or ``z * H z``) into ``state``.

    ``project`` (symmetric, e.g. ``I - Q Q^T`` for Hutch++) is applied to each probe, so the
    samples estimate the trace (or diagonal) of ``P H P`` instead. Resumable: samples already in
    ``state`` count towards ``num_probes``, and the state is saved after each block.
    """
    remaining = num_probes - state.num_samples
    while remaining > 0:
        count = min(remaining, block_size or default_block_size(operator.size, operator.dtype))
        probes = operator.probes(count, state.generator, distribution)
        if project is not None:
            probes = project(probes)
        products = apply(operator, probes, state, block_size, bar, resumable=False)
        samples = probes * products
        if diagonal:  # entrywise: each process keeps its own entries
            accumulate(state, samples.T)
        else:
            accumulate(state, operator.space.column_sums(samples.double()))
        remaining -= count
        state.save_point()


def deflated_trace(
    operator: Operator,
    num_probes: int,
    state: EstimatorState,
    basis: Tensor,
    *,
    distribution: Distribution,
    block_size: int | None,
    bar: Any,
) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr((I - QQ^T) H (I - QQ^T))`` for orthonormal columns ``Q =
    basis`` and its standard error: the part of the trace outside a subspace whose own trace the
    caller knows exactly (Hutch++'s sketch, a Krylov space)."""

    def deflate(probes: Tensor) -> Tensor:
        return probes - basis @ operator.space.inner(basis, probes)

    hutchinson_samples(
        operator,
        num_probes,
        state,
        diagonal=False,
        distribution=distribution,
        block_size=block_size,
        bar=bar,
        project=deflate,
    )
    mean, stderr = mean_and_stderr_or_nan(state)
    return float(mean), float(stderr)
