"""curvlinops' diagonal estimators, each one call of :func:`torch_linop.solvers.diagonal`."""

from __future__ import annotations

from typing import Any

from torch_linop.curvlinops._estimation import (
    check_num_matvecs,
    check_square,
    resolve_seed,
    solver_operand,
    vector_like,
)
from torch_linop.solvers import diagonal


def hutchinson_diag(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of ``diag(A)``: the mean of ``z * (A z)`` over Rademacher probes."""
    check_num_matvecs(num_matvecs, check_square(A))
    if distribution != "rademacher":
        raise ValueError(
            f"hutchinson_diag supports distribution='rademacher' only, got {distribution!r} "
            "(Rademacher probes have the smaller variance for diagonals)"
        )
    result = diagonal(solver_operand(A), num_matvecs, method="hutchinson", seed=resolve_seed(seed))
    return vector_like(result.estimate, A)


def xdiag(A: Any, num_matvecs: int, *, seed: int | None = None) -> Any:
    """XDiag (Epperly et al. 2024); ``num_matvecs`` divisible by 2."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=2)
    result = diagonal(solver_operand(A), num_matvecs, method="xdiag", seed=resolve_seed(seed))
    return vector_like(result.estimate, A)
