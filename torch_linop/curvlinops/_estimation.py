"""What curvlinops' estimators share: which operators they take, curvlinops' argument rules, seeds
from torch's global generator, and results in the caller's world (torch or numpy)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.linalg import LinearOperator

SolverDistribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: dict[str, SolverDistribution] = {
    "rademacher": "rademacher",
    "normal": "gaussian",
    "gaussian": "gaussian",
}


class TorchOperand:
    """A curvlinops 3 ``PyTorchLinearOperator`` (torch ``dtype``) seen through our solvers'
    torch protocol (``device``, ``torch_dtype``, ``shape``, ``matmat``)."""

    def __init__(self, operator: Any) -> None:
        self.operator = operator
        self.device = torch.device(operator.device)
        self.torch_dtype = operator.dtype
        self.shape = tuple(operator.shape)

    def matmat(self, columns: torch.Tensor) -> torch.Tensor:
        return self.operator @ columns


def is_numpy_path(operator: Any) -> bool:
    """scipy operators, ndarrays and sparse matrices without a torch side."""
    if hasattr(operator, "torch_dtype") or isinstance(operator, torch.Tensor):
        return False
    return isinstance(operator, (np.ndarray, LinearOperator)) or scipy.sparse.issparse(operator)


def solver_operand(operator: Any) -> Any:
    """What our solvers accept for ``operator``."""
    if isinstance(getattr(operator, "dtype", None), torch.dtype) and not isinstance(
        operator, torch.Tensor
    ):
        return TorchOperand(operator)
    return operator


def torch_dtype_and_device(operator: Any) -> tuple[torch.dtype, torch.device]:
    operand = solver_operand(operator)
    if isinstance(operand, torch.Tensor):
        return operand.dtype, operand.device
    return operand.torch_dtype, torch.device(operand.device)


def check_square(operator: Any) -> int:
    """curvlinops' rule: a square operator; returns its size."""
    shape = tuple(operator.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"Operator must be square. Got shape {shape}.")
    return int(shape[0])


def check_num_matvecs(num_matvecs: int, size: int, divisor: int = 1) -> None:
    """curvlinops' rules: fewer products than the dimension, divisible by ``divisor``."""
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


def scalar_like(value: float, operator: Any) -> Any:
    """A 0-d tensor on the operator's device (torch path, as curvlinops 3) or a numpy float."""
    if is_numpy_path(operator):
        return np.float64(value)
    dtype, device = torch_dtype_and_device(operator)
    return torch.tensor(value, dtype=dtype, device=device)


def vector_like(values: Any, operator: Any) -> Any:
    """A vector in the operator's world: numpy, or a torch tensor in its dtype and device."""
    if is_numpy_path(operator):
        return np.asarray(
            values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
        )
    dtype, device = torch_dtype_and_device(operator)
    return torch.as_tensor(values).to(device=device, dtype=dtype)
