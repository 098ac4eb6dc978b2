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
    resolve_seed,
)
from torch_linop.solvers import diagonal


def hutchinson_diag(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of ``diag(A)``: the mean of ``z * (A z)`` over Rademacher probes.

    Returns a tensor in ``A``'s dtype on its device (numpy for scipy operators).
    """
    check_num_matvecs(num_matvecs, check_square(A))
    if distribution != "rademacher":
        raise ValueError(
            f"hutchinson_diag supports distribution='rademacher' only, got {distribution!r} "
            "(Rademacher probes have the smaller variance for diagonals)"
        )
    operand = TorchOperand(A)
    result = diagonal(operand, num_matvecs, method="hutchinson", seed=resolve_seed(seed))
    return operand.result(result.estimate)


def xdiag(A: Any, num_matvecs: int, *, seed: int | None = None) -> Any:
    """XDiag (Epperly et al. 2024) for any square ``A``; ``num_matvecs`` divisible by 2."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=2)
    operand = TorchOperand(A)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    return operand.result(xdiag_estimate(operand, num_matvecs // 2, generator))
