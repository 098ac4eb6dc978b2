"""The empirical Fisher ``(1/N) sum_i g_i g_i^T`` without per-sample gradients: ``G v`` from one
forward-mode JVP of the per-sample loss vector, ``G^T (G v)`` from one VJP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import SandwichProduct
from torch_linop.ggn import _require_split
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.operator import CurvatureOperator
from torch_linop.params import ParamFilter


class EmpiricalFisherOperator(CurvatureOperator):
    """Empirical Fisher: mean (or, for ``reduction="sum"`` losses, sum) over samples of the outer
    products of per-sample loss gradients. Memory like a training step, not batch x params."""

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        loss_of_output_fn: Callable[..., torch.Tensor] | None = None,
        *,
        param_filter: ParamFilter | None = None,
        jvp_method: str = "auto",
        **kwargs: Any,
    ) -> None:
        self._sandwich = SandwichProduct(jvp_method)
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, param_filter=param_filter, **kwargs)

    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        def per_sample_losses() -> torch.Tensor:
            output = self.loss_fn.forward(self.model, batch)
            return self.loss_fn.per_sample_losses(output, batch)

        def middle(losses: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
            # batch weight n_b / N times 1 / n_b gives (1/N) sum_i g_i g_i^T
            return vectors / losses.numel() if self.loss_fn.reduction == "mean" else vectors

        return self._sandwich(self.model, per_sample_losses, self.params, tangents, middle)
