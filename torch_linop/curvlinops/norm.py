"""``hutchinson_squared_fro``: ``||A||_F^2 = tr(A^T A)`` by Hutchinson on the Gram operator of
the smaller side, one call of :func:`torch_linop.solvers.trace`."""

from __future__ import annotations

from typing import Any

import torch
from scipy.sparse.linalg import aslinearoperator

from torch_linop.curvlinops._dual import torch_matmat
from torch_linop.curvlinops._estimation import (
    is_numpy_path,
    resolve_seed,
    scalar_like,
    solver_distribution,
    torch_dtype_and_device,
)
from torch_linop.solvers import trace


class _Gram:
    """``B^T B`` for ``B = A`` or ``A^T`` (the smaller side), on the torch path."""

    def __init__(self, A: Any, transpose: bool) -> None:
        self.torch_dtype, self.device = torch_dtype_and_device(A)
        adjoint = A.T if isinstance(A, torch.Tensor) else A.adjoint()
        self._first: Any = adjoint if transpose else A
        self._second: Any = A if transpose else adjoint
        size = A.shape[0] if transpose else A.shape[1]
        self.shape = (size, size)

    def matmat(self, columns: torch.Tensor) -> torch.Tensor:
        return torch_matmat(self._second, torch_matmat(self._first, columns))


def hutchinson_squared_fro(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of the squared Frobenius norm from ``num_matvecs`` probes.

    Each probe costs a product with ``A`` and one with ``A^T`` (curvlinops needs only the first).
    """
    if len(A.shape) != 2:
        raise ValueError(f"A must be a matrix. Got shape {tuple(A.shape)}.")
    if num_matvecs >= min(A.shape):
        raise ValueError(
            f"num_matvecs ({num_matvecs}) must be less than the minimum dimension of A."
        )
    transpose = A.shape[1] > A.shape[0]
    if is_numpy_path(A):
        operator = aslinearoperator(A)
        gram = operator @ operator.H if transpose else operator.H @ operator
    else:
        gram = _Gram(A, transpose)
    result = trace(
        gram,
        num_matvecs,
        method="hutchinson",
        distribution=solver_distribution(distribution),
        seed=resolve_seed(seed),
    )
    return scalar_like(result.estimate, A)
