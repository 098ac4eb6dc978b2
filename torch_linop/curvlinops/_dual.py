"""``DualOperator``: a scipy ``LinearOperator`` that also multiplies torch tensors and tensor
lists, for the operators built on top of another one (sub-matrices, inverses).

The wrapped operator ``A`` may be one of ours, a curvlinops 3 operator, a dense torch tensor or
any scipy ``LinearOperator``/ndarray; :func:`torch_matmat` multiplies it with a torch tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from torch_linop.curvlinops._tensor_list import flat_to_list, list_to_flat
from torch_linop.operator import numpy_dtype_of

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def device_and_dtype(operator: Any) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype torch products with ``operator`` run."""
    if hasattr(operator, "torch_dtype") and hasattr(operator, "device"):
        return torch.device(operator.device), operator.torch_dtype
    if isinstance(operator, torch.Tensor):
        return operator.device, operator.dtype
    dtype = getattr(operator, "dtype", None)
    if isinstance(dtype, torch.dtype) and hasattr(operator, "device"):  # curvlinops 3 operator
        return torch.device(operator.device), dtype
    return torch.device("cpu"), _TORCH_DTYPES.get(np.dtype(dtype or np.float64), torch.float64)


def torch_matmat(operator: Any, columns: torch.Tensor) -> torch.Tensor:
    """``operator @ columns`` for a ``(n, k)`` torch tensor, whatever ``operator`` is."""
    if isinstance(operator, torch.Tensor) or hasattr(operator, "torch_dtype"):
        return operator @ columns
    if isinstance(getattr(operator, "dtype", None), torch.dtype):  # curvlinops 3 operator
        return operator @ columns
    result = operator @ columns.detach().cpu().numpy()
    return torch.as_tensor(np.asarray(result), dtype=columns.dtype, device=columns.device)


class DualOperator(LinearOperator):
    """Subclasses implement ``_apply_torch((n, k) tensor) -> (m, k) tensor`` and ``_adjoint``."""

    def __init__(
        self,
        shape: tuple[int, int],
        device: torch.device,
        torch_dtype: torch.dtype,
        in_shapes: list[torch.Size] | None = None,
        out_shapes: list[torch.Size] | None = None,
    ) -> None:
        super().__init__(dtype=numpy_dtype_of(torch_dtype), shape=shape)
        self.device = device
        self.torch_dtype = torch_dtype
        self._in_shapes = in_shapes or [torch.Size((shape[1],))]
        self._out_shapes = out_shapes or [torch.Size((shape[0],))]

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ torch path
    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(n,)`` or ``(n, k)`` tensor in, ``(m,)`` or ``(m, k)`` out."""
        if tensor.dim() not in (1, 2) or tensor.shape[0] != self.shape[1]:
            raise ValueError(
                f"expected a tensor of shape ({self.shape[1]},) or ({self.shape[1]}, K), got "
                f"{tuple(tensor.shape)}"
            )
        columns = tensor.unsqueeze(1) if tensor.dim() == 1 else tensor
        result = self._apply_torch(columns)
        return result.squeeze(1) if tensor.dim() == 1 else result

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            return self.apply(other)
        if isinstance(other, list):
            flat, is_vector = list_to_flat(other, self._in_shapes)
            return flat_to_list(self.apply(flat), self._out_shapes, is_vector)
        return super().__matmul__(other)

    def matvec(self, x: Any) -> Any:
        return self.apply(x) if isinstance(x, torch.Tensor) else super().matvec(x)

    def matmat(self, X: Any) -> Any:
        return self.apply(X) if isinstance(X, torch.Tensor) else super().matmat(X)

    def rmatvec(self, x: Any) -> Any:
        return self._adjoint().matvec(x)

    def rmatmat(self, X: Any) -> Any:
        return self._adjoint().matmat(X)

    def dot(self, x: Any) -> Any:
        return self.apply(x) if isinstance(x, torch.Tensor) else super().dot(x)

    # ------------------------------------------------------------------ numpy path
    def _apply_numpy(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        out_dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else self.dtype
        tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64))
        result = self.apply(tensor.to(self.device, self.torch_dtype))
        return result.detach().to("cpu", torch.float64).numpy().astype(out_dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply_numpy(np.asarray(x).reshape(-1))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply_numpy(X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._adjoint()._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._adjoint()._matmat(X)

    def _transpose(self) -> LinearOperator:
        return self._adjoint()

    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """Itself (a scipy ``LinearOperator``), or a view in another ``dtype``."""
        if dtype is None or np.dtype(dtype) == self.dtype:
            return self
        target = np.dtype(dtype)
        adjoint = self._adjoint()
        return LinearOperator(
            self.shape,
            matvec=lambda x: self._matvec(x).astype(target, copy=False),
            matmat=lambda X: self._matmat(X).astype(target, copy=False),
            rmatvec=lambda x: adjoint._matvec(x).astype(target, copy=False),
            rmatmat=lambda X: adjoint._matmat(X).astype(target, copy=False),
            dtype=target,
        )
