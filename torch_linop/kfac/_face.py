"""The scipy ``LinearOperator`` face of the Kronecker operators (torch path and numpy path).

Subclasses implement ``_matmat_torch`` on ``(n, k)`` tensors on ``device`` in ``torch_dtype``;
``A @ tensor`` stays in torch, ``A @ ndarray`` converts once each way, so scipy's solvers work.
Kept to the same constructor and hook as the project's shared operator base, which it gives way
to once that lands.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

_NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.float32),
}


class TorchOperatorFace(LinearOperator):
    """``(n, n)`` operator multiplying ``(n,)``/``(n, k)`` tensors and ndarrays."""

    is_symmetric: bool = True

    def __init__(self, shape: tuple[int, int], torch_dtype: torch.dtype, device: Any) -> None:
        if torch_dtype not in _NUMPY_DTYPES:
            raise TypeError(f"Kronecker operators need a floating-point dtype, got {torch_dtype}")
        self.torch_dtype = torch_dtype
        self.device = torch.device(device)
        super().__init__(dtype=_NUMPY_DTYPES[torch_dtype], shape=shape)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Torch path: ``(n,)`` or ``(n, k)`` tensor in, same shape out, on ``device``."""
        size = self.shape[1]
        if tensor.dim() not in (1, 2) or tensor.shape[0] != size:
            raise ValueError(
                f"expected a vector of shape ({size},) or a matrix ({size}, k), got shape "
                f"{tuple(tensor.shape)}"
            )
        if tensor.dtype != self.torch_dtype or tensor.device != self.device:
            raise TypeError(
                f"tensor is {tensor.dtype} on {tensor.device}, the operator {self.torch_dtype} on "
                f"{self.device}; convert it with t.to(A.device, A.torch_dtype)"
            )
        if tensor.dim() == 1:
            return self._matmat_torch(tensor.unsqueeze(1)).squeeze(1)
        return self._matmat_torch(tensor)

    def _numpy_product(self, array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
        columns = tensor.to(self.device, self.torch_dtype).reshape(self.shape[1], -1)
        result = self._matmat_torch(columns).detach().to("cpu", torch.float64).numpy()
        return result.astype(array.dtype if array.dtype.kind == "f" else self.dtype).reshape(
            self.shape[0], *array.shape[1:]
        )

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._numpy_product(np.asarray(x).reshape(-1))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._numpy_product(np.asarray(X))

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def _adjoint(self) -> TorchOperatorFace:
        return self

    def matvec(self, x: Any) -> Any:
        return self.apply(x) if isinstance(x, torch.Tensor) else super().matvec(x)

    def matmat(self, X: Any) -> Any:
        return self.apply(X) if isinstance(X, torch.Tensor) else super().matmat(X)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            return self.apply(other)
        return super().__matmul__(other)
