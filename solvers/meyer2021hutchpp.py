"""Hutch++: a trace estimator that takes the dominant subspace exactly and Hutchinson's estimate
of the rest.

Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021
(arXiv:2010.09649). With a budget of ``m`` products: ``s = m // 3`` go to a sketch ``Q =
orth(H S)``, ``s`` to ``H Q`` for the exact ``tr(Q^T H Q)``, and the remaining ``m - 2s`` to
Hutchinson on ``(I - QQ^T) H (I - QQ^T)``. The error is ``O(1/m)`` instead of Hutchinson's
``O(1/sqrt(m))`` for matrices with decaying spectra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._operator import Operator
from ._random import Distribution, draw_probes
from ._sampling import EstimatorState, apply, mean_and_stderr
from .hutchinson import hutchinson_samples

MIN_MATVECS = 4  # a 1-vector sketch, its product, and two Hutchinson probes for a stderr


def hutchpp(
    operator: Operator,
    num_matvecs: int,
    state: EstimatorState,
    *,
    distribution: Distribution,
    block_size: int | None,
    bar: Any,
) -> tuple[float, float]:
    """Hutch++ estimate of ``tr(H)`` spending exactly ``num_matvecs`` products, and its standard
    error: that of the Hutchinson part, the sketched part being exact given the sketch."""
    sketch_size = num_matvecs // 3
    num_probes = num_matvecs - 2 * sketch_size
    stage = state.stage  # finished steps of a resumed run are skipped
    if "basis" not in stage and "sketch" not in stage:
        stage["sketch"] = draw_probes(
            sketch_size,
            operator.size,
            state.generator,
            distribution=distribution,
            dtype=operator.dtype,
            device=operator.device,
        )
    if "basis" not in stage:
        stage["basis"], _ = torch.linalg.qr(
            apply(operator, stage["sketch"], state, block_size, bar)
        )
        del stage["sketch"]
    basis = stage["basis"]
    if "sketched_trace" not in stage:
        products = apply(operator, basis, state, block_size, bar)
        stage["sketched_trace"] = float((basis * products).sum())
    sketched_trace = stage["sketched_trace"]

    def deflate(probes: Tensor) -> Tensor:
        return probes - basis @ (basis.T @ probes)

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
    residual_mean, residual_stderr = mean_and_stderr(state)
    return sketched_trace + float(residual_mean), float(residual_stderr)
