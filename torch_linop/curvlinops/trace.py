"""curvlinops' trace estimators, each one call of :func:`torch_linop.solvers.trace`."""

from __future__ import annotations

from typing import Any, Literal

from torch_linop.curvlinops._estimation import (
    check_num_matvecs,
    check_square,
    resolve_seed,
    scalar_like,
    solver_distribution,
    solver_operand,
)
from torch_linop.solvers import trace

TraceMethod = Literal["hutch++", "hutchinson", "xtrace"]


def _estimate(
    A: Any, num_matvecs: int, method: TraceMethod, distribution: str, seed: int | None
) -> Any:
    result = trace(
        solver_operand(A),
        num_matvecs,
        method=method,
        distribution=solver_distribution(distribution),
        seed=resolve_seed(seed),
    )
    return scalar_like(result.estimate, A)


def hutchinson_trace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of ``tr(A)`` from ``num_matvecs`` random probes."""
    check_num_matvecs(num_matvecs, check_square(A))
    return _estimate(A, num_matvecs, "hutchinson", distribution, seed)


def hutchpp_trace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutch++ (Meyer et al. 2021); ``num_matvecs`` divisible by 3."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=3)
    return _estimate(A, num_matvecs, "hutch++", distribution, seed)


def xtrace(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """XTrace (Epperly et al. 2024); ``num_matvecs`` divisible by 2."""
    check_num_matvecs(num_matvecs, check_square(A), divisor=2)
    return _estimate(A, num_matvecs, "xtrace", distribution, seed)
