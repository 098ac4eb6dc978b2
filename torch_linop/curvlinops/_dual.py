"""``DualOperator``: a :class:`PyTorchLinearOperator` built on top of another operator (sub-matrices,
inverses) whose subclasses multiply flat ``(n, k)`` torch tensors.

The wrapped operator ``A`` may be a drop-in operator, a curvlinops 3 operator, one of our
torch-linop operators, a dense torch tensor or any scipy ``LinearOperator``/ndarray;
:func:`torch_matmat` multiplies it with a torch tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_linop.curvlinops._torch_base import (
    PyTorchLinearOperator,
    is_protocol_operator,
    operator_dtype,
)

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def device_and_dtype(operator: Any) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype torch products with ``operator`` run."""
    if isinstance(operator, torch.Tensor):
        return operator.device, operator.dtype
    if is_protocol_operator(operator):
        return torch.device(operator.device), operator_dtype(operator)
    dtype = getattr(operator, "dtype", None)
    return torch.device("cpu"), _TORCH_DTYPES.get(np.dtype(dtype or np.float64), torch.float64)


def torch_matmat(operator: Any, columns: torch.Tensor) -> torch.Tensor:
    """``operator @ columns`` for a ``(n, k)`` torch tensor, whatever ``operator`` is."""
    if isinstance(operator, torch.Tensor) or is_protocol_operator(operator):
        return operator @ columns
    result = operator @ columns.detach().cpu().numpy()
    return torch.as_tensor(np.asarray(result), dtype=columns.dtype, device=columns.device)


class DualOperator(PyTorchLinearOperator):
    """Subclasses implement ``_apply_torch((n, k) tensor) -> (m, k) tensor`` and ``_adjoint``."""

    def __init__(
        self,
        shape: tuple[int, int],
        device: torch.device,
        torch_dtype: torch.dtype,
        in_shapes: list[torch.Size] | None = None,
        out_shapes: list[torch.Size] | None = None,
    ) -> None:
        super().__init__(
            in_shapes or [torch.Size((shape[1],))], out_shapes or [torch.Size((shape[0],))]
        )
        self._device, self._dtype = torch.device(device), torch_dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in X])
        product = self._apply_torch(flat)
        return [
            chunk.reshape(*shape, flat.shape[1])
            for chunk, shape in zip(product.split(self._out_shape_flat), self._out_shape)
        ]

    def _matmat_tensor(self, X: torch.Tensor) -> torch.Tensor:
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"Input tensor must have shape ({self.shape[1]},) or ({self.shape[1]}, K), with K "
                f"arbitrary. Got {tuple(X.shape)}."
            )
        result = self._apply_torch(X.unsqueeze(1) if X.ndim == 1 else X)
        return result.squeeze(1) if X.ndim == 1 else result
