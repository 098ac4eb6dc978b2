"""``HessianLinearOperator``: our :class:`~torch_linop.HessianOperator` with curvlinops'
arguments, including ``block_sizes`` (a block-diagonal Hessian over groups of parameters)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from torch_linop.curvlinops._base import CurvlinopsInterface
from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._loss import BatchSizeFn
from torch_linop.hessian import HessianOperator
from torch_linop.options import ProductOptions


def check_block_sizes(block_sizes: Sequence[int] | None, num_params: int) -> list[int]:
    """curvlinops' rules: positive sizes that sum to the number of parameter tensors."""
    if block_sizes is None:
        return [num_params]
    sizes = list(block_sizes)
    if sum(sizes) != num_params:
        raise ValueError(
            f"Sum of blocks must equal the number of parameters: block_sizes={sizes} sums to "
            f"{sum(sizes)}, but there are {num_params} parameter tensors."
        )
    if any(not isinstance(size, int) or size <= 0 for size in sizes):
        raise ValueError(f"Block sizes must be positive integers, got {sizes}.")
    return sizes


class CurvlinopsHessian(CurvlinopsInterface, HessianOperator):
    """Our Hessian operator built from curvlinops' arguments (the matrix behind
    :class:`HessianLinearOperator`)."""

    def __init__(
        self,
        model_func: torch.nn.Module,
        loss_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        block_sizes: Sequence[int] | None = None,
    ) -> None:
        model, loss = self._prepare(model_func, loss_func, params, data, batch_size_fn)
        self._block_sizes = check_block_sizes(block_sizes, len(self._given_params))
        HessianOperator.__init__(
            self,
            model,
            data,
            loss,
            options=ProductOptions(num_data=num_data, progress=progressbar),
        )
        if check_deterministic:
            self.check_deterministic()

    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full Hessian, or block-diagonal: block ``b`` of ``H (P_b V)`` for each block ``b``,
        with all blocks' columns in one batched product."""
        num_blocks = len(self._block_sizes)
        if num_blocks == 1:
            return super().batch_product(batch, tangents)
        block_of = [b for b, size in enumerate(self._block_sizes) for _ in range(size)]
        num_columns = tangents[0].shape[0]
        masked = [
            torch.cat([t if block_of[i] == b else torch.zeros_like(t) for b in range(num_blocks)])
            for i, t in enumerate(tangents)
        ]
        products = super().batch_product(batch, masked)
        return [
            product.reshape(num_blocks, num_columns, *product.shape[1:])[block_of[i]]
            for i, product in enumerate(products)
        ]


class HessianLinearOperator(CurvatureLinearOperator):
    """Hessian of the empirical risk ``c sum_n loss(f(x_n), y_n)`` (c = 1/N or 1).

    ``block_sizes=[2, 1]`` multiplies with the block-diagonal Hessian whose blocks are the first
    two parameter tensors and the third.
    """

    SUPPORTS_BLOCKS = True

    def __init__(
        self,
        model_func: torch.nn.Module,
        loss_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        block_sizes: Sequence[int] | None = None,
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        operator = CurvlinopsHessian(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            block_sizes=block_sizes,
        )
        super().__init__(operator, params, data)
        self._block_sizes = operator._block_sizes
