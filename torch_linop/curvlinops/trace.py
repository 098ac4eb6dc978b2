"""curvlinops' trace estimators, valid for any square operator (symmetric or not).

``hutchinson_trace`` is one call of :func:`torch_linop.solvers.trace`; Hutch++ and XTrace follow
curvlinops' formulas, which use ``A`` and ``A^T`` as they are (our solvers' versions assume a
symmetric operator), in :mod:`torch_linop.curvlinops._epperly2024xtrace` and here.
"""

from __future__ import annotations

from typing import Any

import torch

from torch_linop.curvlinops._epperly2024xtrace import xtrace_estimate
from torch_linop.curvlinops._estimation import (
    TorchOperand,
    check_num_matvecs,
    check_square,
    draw_probes,
    resolve_seed,
    solver_distribution,
)
from torch_linop.solvers import trace


def hutchinson_trace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate ``mean(z^T A z)`` of ``tr(A)`` from ``num_matvecs`` probes.

    Returns a 0-d tensor in ``A``'s dtype on its device (numpy for scipy operators).
    """
    check_num_matvecs(num_matvecs, check_square(A))
    operand = TorchOperand(A)
    result = trace(
        operand,
        num_matvecs,
        method="hutchinson",
        distribution=solver_distribution(distribution),
        seed=resolve_seed(seed),
    )
    return operand.result(result.estimate)


def hutchpp_trace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutch++ (Meyer et al. 2021): with ``N = num_matvecs / 3``, the exact trace on ``Q = orth(A
    S)`` for ``N`` probes ``S``, plus Hutchinson with ``N`` probes on ``(I - QQ^T) A (I - QQ^T)``
    (unbiased for any square ``A``); ``num_matvecs`` divisible by 3."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=3)
    operand = TorchOperand(A)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    count = num_matvecs // 3
    basis, _ = torch.linalg.qr(operand.matmat(draw_probes(operand, count, distribution, generator)))
    sketched = (basis * operand.matmat(basis)).sum()
    probes = draw_probes(operand, count, distribution, generator)
    projected = probes - basis @ (basis.T @ probes)
    products = operand.matmat(projected)
    products = products - basis @ (basis.T @ products)
    return operand.result(sketched + (probes * products).sum() / count)


def xtrace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """XTrace (Epperly et al. 2024) for any square ``A``; ``num_matvecs`` divisible by 2."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=2)
    operand = TorchOperand(A)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    return operand.result(xtrace_estimate(operand, num_matvecs // 2, distribution, generator))
