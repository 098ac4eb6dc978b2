"""``SubmatrixLinearOperator``: the sub-matrix ``A[row_idxs][:, col_idxs]`` of any operator."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch

from torch_linop.curvlinops._dual import DualOperator, device_and_dtype, torch_matmat


def _check_indices(indices: Sequence[int], size: int, axis: str) -> list[int]:
    values = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, Integral) for i in values):
        raise ValueError(f"Index lists must contain integers; {axis} indices are {values[:8]}")
    if len(values) != len(set(values)):
        raise ValueError(f"Index lists cannot contain duplicates ({axis} indices)")
    if any(i < 0 or i >= size for i in values):
        raise ValueError(f"Index lists contain out-of-bounds indices: {axis} size is {size}")
    return [int(i) for i in values]


class SubmatrixLinearOperator(DualOperator):
    """``A[row_idxs, :][:, col_idxs]``; multiplies ndarrays, torch tensors and tensor lists."""

    def __init__(self, A: Any, row_idxs: Sequence[int], col_idxs: Sequence[int]) -> None:
        self._A = A
        self.set_submatrix(row_idxs, col_idxs)

    def set_submatrix(self, row_idxs: Sequence[int], col_idxs: Sequence[int]) -> None:
        """Choose the rows and columns (unique, in-bounds integers); sets the shape."""
        rows = _check_indices(row_idxs, self._A.shape[0], "row")
        cols = _check_indices(col_idxs, self._A.shape[1], "column")
        device, dtype = device_and_dtype(self._A)
        DualOperator.__init__(self, (len(rows), len(cols)), device, dtype)
        self._row_idxs, self._col_idxs = rows, cols

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        padded = columns.new_zeros((self._A.shape[1], columns.shape[1]))
        padded[self._col_idxs] = columns
        return torch_matmat(self._A, padded)[self._row_idxs]

    def _adjoint(self) -> SubmatrixLinearOperator:
        return SubmatrixLinearOperator(self._A.adjoint(), self._col_idxs, self._row_idxs)

    def adjoint(self) -> SubmatrixLinearOperator:
        return self._adjoint()
