"""``EFLinearOperator``: our empirical Fisher with curvlinops' normalisation (see
:meth:`CriterionLoss.ef_scale`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from torch_linop.curvlinops._base import CurvlinopsInterface
from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._loss import BatchSizeFn, require_supported
from torch_linop.curvlinops.ggn import reject_blocks
from torch_linop.empirical_fisher import EmpiricalFisherOperator
from torch_linop.options import ProductOptions


class CurvlinopsEF(CurvlinopsInterface, EmpiricalFisherOperator):
    """Our empirical Fisher built from curvlinops' arguments (the matrix behind
    :class:`EFLinearOperator`)."""

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
    ) -> None:
        require_supported(loss_func, "EFLinearOperator")
        model, loss = self._prepare(model_func, loss_func, params, data, batch_size_fn)
        EmpiricalFisherOperator.__init__(
            self, model, data, loss, options=ProductOptions(num_data=num_data, progress=progressbar)
        )
        if check_deterministic:
            self.check_deterministic()

    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """``J^T (s J V)`` with J the Jacobian of the row losses and s curvlinops' factor."""

        def row_losses() -> torch.Tensor:
            return self._criterion_loss.per_sample_losses(
                self._criterion_loss.forward(self.model, batch), batch
            )

        def middle(losses: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
            return vectors * self._criterion_loss.ef_scale(batch, losses.numel())

        return self._sandwich(self.model, row_losses, self.params, tangents, middle)


class EFLinearOperator(CurvatureLinearOperator):
    """Uncentered gradient covariance ("empirical Fisher") ``c sum_n g_n g_n^T`` of MSE,
    cross-entropy or BCE-with-logits losses, with outputs of any rank flattened into rows."""

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
        reject_blocks(block_sizes, type(self).__name__)
        operator = CurvlinopsEF(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )
        super().__init__(operator, params, data)
