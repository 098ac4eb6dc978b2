"""curvlinops' diagonal estimators, valid for any square operator (symmetric or not):
Hutchinson's is one call of :func:`torch_linop.solvers.diagonal`, XDiag follows curvlinops'
formula (:mod:`torch_linop.curvlinops._epperly2024xtrace`)."""

from __future__ import annotations

from typing import Any

import torch

from torch_linop.curvlinops._epperly2024xtrace import xdiag_estimate
from torch_linop.curvlinops._estimation import (
    TorchOperand,
    check_num_matvecs,
    check_square,
    draw_probes,
    resolve_seed,
    solver_distribution,
)
from torch_linop.solvers import diagonal


def hutchinson_diag(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of ``diag(A)``: the mean of ``z * (A z)`` over ``num_matvecs``
    probes (Rademacher: streamed by our solvers; ``"normal"``: all at once, as curvlinops).

    Returns a tensor in ``A``'s dtype on its device (numpy for scipy operators).
    """
    check_num_matvecs(num_matvecs, check_square(A))
    solver_distribution(distribution)  # ValueError for unknown names
    operand = TorchOperand(A)
    if distribution == "rademacher":
        result = diagonal(operand, num_matvecs, method="hutchinson", seed=resolve_seed(seed))
        return operand.result(result.estimate)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    probes = draw_probes(operand, num_matvecs, distribution, generator)
    return operand.result((probes * operand.matmat(probes)).mean(1))


def xdiag(A: Any, num_matvecs: int, *, seed: int | None = None) -> Any:
    """XDiag (Epperly et al. 2024) for any square ``A``; ``num_matvecs`` divisible by 2."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=2)
    operand = TorchOperand(A)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    return operand.result(xdiag_estimate(operand, num_matvecs // 2, generator))
