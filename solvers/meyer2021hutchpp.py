"""Hutch++: a trace estimator that takes the dominant subspace exactly and Hutchinson's estimate
of the rest.

Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021
(arXiv:2010.09649). With a budget of ``m`` products: ``s = m // 3`` go to a sketch ``Q =
orth(H S)``, ``s`` to ``H Q`` for the exact ``tr(Q^T H Q)``, and the remaining ``m - 2s`` to
Hutchinson on ``(I - QQ^T) H (I - QQ^T)``. The error is ``O(1/m)`` instead of Hutchinson's
``O(1/sqrt(m))`` for matrices with decaying spectra.
"""

from __future__ import annotations

import warnings
from typing import Any

from ._memory import device_budget, vectors_within
from ._operator import Operator
from ._random import Distribution
from ._sampling import EstimatorState, apply
from .hutchinson import deflated_trace

MIN_MATVECS = 4  # a 1-vector sketch, its product, and two Hutchinson probes for a stderr


def _sketch_size(operator: Operator, num_matvecs: int, stage: dict[str, Any]) -> int:
    """``num_matvecs // 3``, capped on a GPU so that the sketch's three n x s buffers (probes,
    products, orthonormal basis) fit in free memory; the products saved go to Hutchinson probes,
    so the budget is still spent exactly (a resumed run keeps its sketch)."""
    for key in ("basis", "sketch"):
        if key in stage:
            return int(stage[key].shape[1])
    sketch_size = num_matvecs // 3
    cap = vectors_within(device_budget(operator.device), operator.length, operator.dtype, copies=3)
    cap = operator.space.agreed_min(cap)
    if cap is not None and cap < sketch_size:
        warnings.warn(
            f"hutch++: the sketch holds {max(cap, 1)} vectors instead of {sketch_size} so that it "
            "fits in free device memory; the other products go to Hutchinson probes",
            RuntimeWarning,
            stacklevel=3,
        )
        sketch_size = max(1, cap)
    return sketch_size


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
    stage = state.stage  # finished steps of a resumed run are skipped
    sketch_size = _sketch_size(operator, num_matvecs, stage)
    num_probes = num_matvecs - 2 * sketch_size
    if "basis" not in stage and "sketch" not in stage:
        stage["sketch"] = operator.probes(sketch_size, state.generator, distribution)
    if "basis" not in stage:
        images = apply(operator, stage["sketch"], state, block_size, bar)
        stage["basis"], _ = operator.space.tall_qr(images)
        del stage["sketch"]
    basis = stage["basis"]
    if "sketched_trace" not in stage:
        products = apply(operator, basis, state, block_size, bar)
        stage["sketched_trace"] = float(operator.space.column_sums(basis * products).sum())
    sketched_trace = stage["sketched_trace"]

    residual_mean, residual_stderr = deflated_trace(
        operator,
        num_probes,
        state,
        basis,
        distribution=distribution,
        block_size=block_size,
        bar=bar,
    )
    return sketched_trace + residual_mean, residual_stderr
