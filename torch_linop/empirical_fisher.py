"""The empirical Fisher ``(1/N) sum_i g_i g_i^T`` without per-sample gradients: ``G v`` from one
forward-mode JVP of the per-sample loss vector, ``G^T (G v)`` from one VJP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import SandwichProduct
from torch_linop._graph_cache import GraphCachingOperator, KeptForward
from torch_linop.ggn import _require_split
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.params import ParamFilter


class EmpiricalFisherOperator(GraphCachingOperator):
    """Empirical Fisher: mean (or, for ``reduction="sum"`` losses, sum) over samples of the outer
    products of per-sample loss gradients. Memory like a training step, not batch x params.

    ``cache_graph=True`` keeps each batch's forward graph (of the per-sample losses) between
    products, as ``GGNOperator(cache_graph=True)`` does: a product is then a JVP that records no
    graph and one backward; ``cuda_graph=True`` replays that product from a CUDA graph, as for
    the GGN.
    """

    _JVP_ON_KEPT_GRAPH = True  # products: a JVP forward pass and one backward

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        loss_of_output_fn: Callable[..., torch.Tensor] | None = None,
        *,
        param_filter: ParamFilter | None = None,
        jvp_method: str = "auto",
        cache_graph: bool = False,
        cuda_graph: bool = False,
        **kwargs: Any,
    ) -> None:
        self._sandwich = SandwichProduct(jvp_method)
        self._init_graph_cache(cache_graph, cuda_graph)
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, param_filter=param_filter, **kwargs)

    def _losses_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        def per_sample_losses() -> torch.Tensor:
            output = self.loss_fn.forward(self.model, batch)
            return self.loss_fn.per_sample_losses(output, batch)

        return per_sample_losses

    def _middle(self, losses: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        # batch weight n_b / N times 1 / n_b gives (1/N) sum_i g_i g_i^T
        return vectors / losses.numel() if self.loss_fn.reduction == "mean" else vectors

    def _build_graph(self, weight: float, batch: Any) -> KeptForward:
        return self._kept_forward(weight, batch, self._losses_of(batch))

    def _cached_product(
        self, graph: KeptForward, tangents: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        forward = self._losses_of(graph.batch)
        return self._sandwich.on_kept_graph(
            self.model, forward, graph.leaves, graph.output, tangents, self._middle
        )

    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        forward = self._losses_of(batch)
        return self._sandwich(self.model, forward, self.params, tangents, self._middle)
