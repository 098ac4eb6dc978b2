"""XTrace and XDiag: exchangeable trace and diagonal estimators that reuse every probe both in
the sketch and in the Hutchinson correction.

Epperly, Tropp and Webber, "XTrace: Making the Most of Every Sample in Stochastic Trace
Estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024 (arXiv:2301.07825). With ``s`` probes ``W``
and ``Q R = H W``, estimate ``i`` uses the basis ``Q_i`` of all products but the i-th and the
i-th probe for Hutchinson on the complement:

    t_i = tr(Q_i^T H Q_i) + w_i^T (I - Q_i Q_i^T) H (I - Q_i Q_i^T) w_i,

and the estimate is the mean of the ``t_i`` (``2 s`` products: ``H W`` and ``H Q``). Leaving one
column out is a rank-one downdate ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with ``s_i`` the
normalised i-th column of ``R^{-T}``, so all ``s`` estimates cost ``O(n s^2)``. The standard
error is the paper's: the standard deviation of the ``t_i`` over ``sqrt(s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._operator import Operator
from ._random import Distribution
from ._sampling import EstimatorState, apply

MIN_MATVECS = 4  # two probes: one left out, one kept


def xtrace(
    operator: Operator,
    num_matvecs: int,
    state: EstimatorState,
    *,
    distribution: Distribution,
    block_size: int | None,
    bar: Any,
) -> tuple[float, float]:
    """XTrace estimate of ``tr(H)`` with ``2 * (num_matvecs // 2)`` products, and its stderr."""
    sketch = _take_sketch(operator, num_matvecs // 2, state, distribution, block_size, bar)
    if sketch.downdates is None:  # the sketch spans the range of H: the trace is exact
        return float(torch.diagonal(sketch.projected).sum()), 0.0
    downdates = sketch.downdates
    projected_trace = torch.diagonal(sketch.projected).sum()
    space = operator.space
    left_out_trace = ((downdates.T @ sketch.projected) * downdates.T).sum(dim=1)
    deflated_products = sketch.products - sketch.basis_products @ _downdate(
        space.inner(sketch.basis, sketch.probes), downdates
    )
    complement = deflated_products - sketch.basis @ _downdate(
        space.inner(sketch.basis, deflated_products), downdates
    )
    estimates = projected_trace - left_out_trace + space.column_sums(sketch.probes * complement)
    return _mean_and_stderr(estimates)


def xdiag(
    operator: Operator, num_matvecs: int, state: EstimatorState, *, block_size: int | None, bar: Any
) -> tuple[Tensor, Tensor]:
    """XDiag estimate of ``diag(H)`` (Rademacher probes) with ``2 * (num_matvecs // 2)``
    products, and its entrywise stderr.

    ``d_i = diag(Q_i Q_i^T H) + w_i * ((I - Q_i Q_i^T) H w_i)``, averaged over ``i``.
    """
    sketch = _take_sketch(operator, num_matvecs // 2, state, "rademacher", block_size, bar)
    sketched_diagonal = (sketch.basis * sketch.basis_products).sum(dim=1)
    if sketch.downdates is None:
        return sketched_diagonal.double(), torch.zeros_like(sketched_diagonal, dtype=torch.float64)
    downdates = sketch.downdates
    left_out = (sketch.basis @ downdates) * (sketch.basis_products @ downdates)
    complement = sketch.products - sketch.basis @ _downdate(
        operator.space.inner(sketch.basis, sketch.products), downdates
    )
    estimates = sketched_diagonal[:, None] - left_out + sketch.probes * complement
    return _mean_and_stderr(estimates.T)


@dataclass
class _Sketch:
    """Probes ``W``, products ``H W``, ``Q`` from ``QR(H W)``, ``H Q``, ``Q^T H Q`` and the
    normalised columns of ``R^{-T}`` (None when ``H W`` is rank deficient)."""

    probes: Tensor
    products: Tensor
    basis: Tensor
    basis_products: Tensor
    projected: Tensor
    downdates: Tensor | None


def _take_sketch(
    operator: Operator,
    num_probes: int,
    state: EstimatorState,
    distribution: Distribution,
    block_size: int | None,
    bar: Any,
) -> _Sketch:
    stage = state.stage  # finished steps of a resumed run are skipped
    if "probes" not in stage:
        stage["probes"] = operator.probes(num_probes, state.generator, distribution)
    if "products" not in stage:
        stage["products"] = apply(operator, stage["probes"], state, block_size, bar)
        stage["basis"], stage["triangular"] = operator.space.tall_qr(stage["products"])
    probes, products = stage["probes"], stage["products"]
    basis, triangular = stage["basis"], stage["triangular"]
    basis_products = apply(operator, basis, state, block_size, bar)
    projected = operator.space.inner(basis, basis_products)
    projected = (projected + projected.T) / 2
    diagonal = torch.diagonal(triangular).abs()
    downdates = None
    if bool(diagonal.min() > num_probes * torch.finfo(triangular.dtype).eps * diagonal.max()):
        identity = torch.eye(num_probes, dtype=triangular.dtype, device=triangular.device)
        inverse_t = torch.linalg.solve_triangular(triangular, identity, upper=True).T
        downdates = inverse_t / torch.linalg.vector_norm(inverse_t, dim=0)
    return _Sketch(probes, products, basis, basis_products, projected, downdates)


def _downdate(coordinates: Tensor, downdates: Tensor) -> Tensor:
    """Column i of ``coordinates`` times ``I - s_i s_i^T`` (s_i = column i of ``downdates``)."""
    return coordinates - downdates * (downdates * coordinates).sum(dim=0)


def _mean_and_stderr(estimates: Tensor) -> tuple[Any, Any]:
    """Mean over dim 0 and its standard error (float64); scalars come back as floats."""
    estimates = estimates.to(torch.float64)
    mean = estimates.mean(dim=0)
    stderr = estimates.std(dim=0) / estimates.shape[0] ** 0.5
    if mean.dim() == 0:
        return float(mean), float(stderr)
    return mean, stderr
