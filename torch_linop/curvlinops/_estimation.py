"""What curvlinops' estimators share: one torch view of any square operator they take, curvlinops'
argument rules, probes from a seed (or torch's global generator, as curvlinops), and results in
the caller's world (a tensor on the operator's device, or numpy for scipy operators)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator
from torch import Tensor

from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._torch_base import is_protocol_operator, operator_dtype

SolverDistribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: dict[str, SolverDistribution] = {
    "rademacher": "rademacher",
    "normal": "gaussian",
    "gaussian": "gaussian",
}


def is_numpy_path(operator: Any) -> bool:
    """scipy operators, ndarrays and sparse matrices without a torch side."""
    if isinstance(operator, Tensor) or is_protocol_operator(operator):
        return False
    return isinstance(operator, (np.ndarray, LinearOperator)) or scipy.sparse.issparse(operator)


class TorchOperand:
    """A square or rectangular operator as torch products ``matmat``/``rmatmat`` on ``(n, k)``
    tensors, in our solvers' torch protocol (``shape``, ``device``, ``torch_dtype``, ``matmat``).

    Takes a dense tensor (any square matrix: no symmetry is assumed), a curvlinops 3 protocol
    operator (ours, curvlinops', a user's; ours multiply through our operator directly), one of
    our torch-linop operators, or (numpy path) a scipy operator / ndarray / sparse matrix, which
    is multiplied in float64 on the CPU.
    """

    def __init__(self, A: Any) -> None:
        self.returns_numpy = is_numpy_path(A)
        self.shape = (int(A.shape[0]), int(A.shape[1])) if len(A.shape) == 2 else tuple(A.shape)
        self._A = A
        self._adjoint: Any = None
        if self.returns_numpy:
            self.device, self.torch_dtype = torch.device("cpu"), torch.float64
            self._linear = aslinearoperator(A)
        elif isinstance(A, Tensor):
            self.device, self.torch_dtype = A.device, A.dtype
        elif is_protocol_operator(A):
            self.device, self.torch_dtype = torch.device(A.device), operator_dtype(A)
        else:
            raise TypeError(
                f"cannot estimate with an object of type {type(A).__name__}; pass a torch.Tensor, "
                "an operator with curvlinops 3's protocol (shape, dtype, device, @), or a scipy "
                "LinearOperator"
            )

    def matmat(self, X: Tensor) -> Tensor:
        """``A @ X`` for a ``(n, k)`` tensor in ``torch_dtype`` on ``device``."""
        if self.returns_numpy:
            return torch.from_numpy(np.asarray(self._linear.matmat(X.numpy()), dtype=np.float64))
        if isinstance(self._A, CurvatureLinearOperator):
            return self._A.operator.apply(X)
        return self._A @ X

    def rmatmat(self, X: Tensor) -> Tensor:
        """``A^T @ X``."""
        if self.returns_numpy:
            return torch.from_numpy(np.asarray(self._linear.rmatmat(X.numpy()), dtype=np.float64))
        if isinstance(self._A, Tensor):
            return self._A.T @ X
        if self._adjoint is None:
            self._adjoint = self._A.adjoint()
        return self._adjoint @ X

    def result(self, value: Any) -> Any:
        """``value`` (a float or tensor) in the caller's world."""
        if self.returns_numpy:
            if isinstance(value, Tensor):
                array = value.detach().cpu().double().numpy()
                return array if array.ndim else np.float64(array)
            return np.float64(value)
        return torch.as_tensor(value).to(device=self.device, dtype=self.torch_dtype)


def check_square(operator: Any) -> int:
    """curvlinops' rule: a square operator; returns its size."""
    shape = tuple(operator.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"Operator must be square. Got shape {shape}.")
    return int(shape[0])


def check_num_matvecs(num_matvecs: int, size: int, divisor: int = 1) -> None:
    """curvlinops' rules: a positive count below the dimension, divisible by ``divisor``."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < 1:
        raise ValueError(f"num_matvecs must be a positive int, got {num_matvecs!r}.")
    if num_matvecs >= size:
        raise ValueError(f"num_matvecs ({num_matvecs}) must be less than A's size ({size}).")
    if num_matvecs % divisor != 0:
        raise ValueError(f"num_matvecs ({num_matvecs}) must be divisible by {divisor}.")


def solver_distribution(distribution: str) -> SolverDistribution:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"Unknown distribution {distribution!r}; use 'rademacher' or 'normal'.")
    return DISTRIBUTIONS[distribution]


def resolve_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's global generator (curvlinops samples from it, so
    ``torch.manual_seed`` makes both reproducible)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (1,)).item())


def draw_probes(
    operand: TorchOperand,
    count: int,
    distribution: str,
    generator: torch.Generator,
    size: int | None = None,
) -> Tensor:
    """``(size, count)`` probes with ``E[z z^T] = I`` (``size``: the operand's columns by
    default), drawn on the CPU (the same numbers on every device) and moved to the operand's
    device and dtype."""
    size = operand.shape[1] if size is None else size
    if solver_distribution(distribution) == "rademacher":
        probes = torch.randint(0, 2, (size, count), generator=generator).double() * 2 - 1
    else:
        probes = torch.randn(size, count, generator=generator, dtype=torch.float64)
    return probes.to(device=operand.device, dtype=operand.torch_dtype)
