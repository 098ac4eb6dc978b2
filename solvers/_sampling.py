"""Shared plumbing of the randomized estimators: their explicit state, products in column
blocks, and a streaming mean / standard error over samples (Chan et al.'s pairwise update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._operator import Operator, check_finite


@dataclass
class EstimatorState:
    """Everything an estimator needs to continue: the probe generator, products spent, and the
    running mean and sum of squared deviations (``m2``) of the samples taken so far."""

    generator: torch.Generator
    num_matvecs: int = 0
    num_samples: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None


def apply(
    operator: Operator, columns: Tensor, state: EstimatorState, block_size: int | None, bar: Any
) -> Tensor:
    """``H @ columns`` taken ``block_size`` columns at a time (all at once for None)."""
    outputs = []
    for chunk in columns.split(block_size or columns.shape[1], dim=1):
        product = operator.matmat(chunk)
        check_finite(product, state.num_matvecs)
        state.num_matvecs += chunk.shape[1]
        bar.update(chunk.shape[1])
        outputs.append(product)
    return torch.cat(outputs, dim=1)


def accumulate(state: EstimatorState, samples: Tensor) -> None:
    """Fold ``samples`` (one per entry along dim 0) into the running mean and ``m2``, kept in
    the dtype of ``samples`` (callers pass float64 for scalars; n-vectors stay in the operator's
    dtype to bound memory)."""
    count = samples.shape[0]
    block_mean = samples.mean(dim=0)
    block_m2 = ((samples - block_mean) ** 2).sum(dim=0)
    if state.mean is None or state.m2 is None:
        state.mean, state.m2 = block_mean, block_m2
    else:
        total = state.num_samples + count
        delta = block_mean - state.mean
        state.mean = state.mean + delta * (count / total)
        state.m2 = state.m2 + block_m2 + delta**2 * (state.num_samples * count / total)
    state.num_samples += count


def mean_and_stderr(state: EstimatorState) -> tuple[Tensor, Tensor]:
    """The sample mean and its standard error ``std / sqrt(num_samples)`` (ddof = 1)."""
    if state.mean is None or state.m2 is None or state.num_samples < 2:
        raise RuntimeError("a standard error needs at least two samples")
    variance = state.m2 / (state.num_samples - 1)
    return state.mean, (variance / state.num_samples).sqrt()
