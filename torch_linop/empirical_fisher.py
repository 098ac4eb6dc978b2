"""The empirical Fisher ``(1/N) sum_i g_i g_i^T`` without per-sample gradients: a sandwich product
(:mod:`torch_linop.products`) on the per-sample loss vector, ``G v`` from one JVP of it,
``G^T (G v)`` from one VJP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop._graph_cache import GraphCachingOperator, KeptForward
from torch_linop.ggn import _require_split
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.options import ProductOptions, accepts_old_option_keywords, resolve_options
from torch_linop.params import ParamFilter
from torch_linop.products.capability import Capabilities
from torch_linop.products.jvp import make_jvp
from torch_linop.products.middle import empirical_fisher_middle
from torch_linop.products.sandwich import Sandwich

# every JVP of the GGN applies to the per-sample losses: exact forward mode (with the probed
# double-backward fallback under "auto"), double backward, central or one-sided differences
EF_JVP_METHODS = ("auto", "forward", "double_backward", "finite_difference", "forward_difference")


class EmpiricalFisherOperator(GraphCachingOperator):
    """Empirical Fisher: mean (or, for ``reduction="sum"`` losses, sum) over samples of the outer
    products of per-sample loss gradients. Memory like a training step, not batch x params.

    ``cache_graph=True`` keeps each batch's forward graph (of the per-sample losses) between
    products, as ``GGNOperator(cache_graph=True)`` does: a product is then a JVP that records no
    graph and one backward; ``options=ProductOptions(cuda_graph=True)`` replays that product
    from a CUDA graph, as for the GGN. The other rarely needed options (how many batches, a
    process group, ...) are also set by ``options=``
    (:class:`~torch_linop.options.ProductOptions`).

    ``jvp_method``: how the JVP of the per-sample losses is taken, with the GGN's choices
    (``"auto"``: forward mode, falling back once to the exact double-backward JVP for models
    without forward-mode AD; ``"forward"``; ``"double_backward"``; ``"finite_difference"`` and
    ``"forward_difference"``, approximate).
    """

    _JVP_ON_KEPT_GRAPH = True  # products: a JVP forward pass and one backward

    @accepts_old_option_keywords
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
        options: ProductOptions | None = None,
    ) -> None:
        options = resolve_options(options)
        self.jvp_method = jvp_method
        self.capabilities = Capabilities()
        jvp = make_jvp(
            jvp_method,
            self.capabilities,
            owner=type(self).__name__,
            valid=EF_JVP_METHODS,
            cuda_graph=options.cuda_graph,
        )
        self._sandwich = Sandwich(jvp, self.capabilities.batched_backward)
        self._init_graph_cache(cache_graph, options.cuda_graph)
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, param_filter=param_filter, options=options)

    def _losses_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        def per_sample_losses() -> torch.Tensor:
            output = self.loss_fn.forward(self.model, batch)
            return self.loss_fn.per_sample_losses(output, batch)

        return per_sample_losses

    def _build_graph(self, weight: float, batch: Any) -> KeptForward:
        return self._kept_forward(weight, batch, self._losses_of(batch))

    def _cached_product(
        self, graph: KeptForward, tangents: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        forward = self._losses_of(graph.batch)
        return self._sandwich.on_kept_graph(
            self.model, forward, graph.leaves, graph.output, tangents, self._middle()
        )

    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        forward = self._losses_of(batch)
        return self._sandwich(self.model, forward, self.params, tangents, self._middle())

    def _middle(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return empirical_fisher_middle(self.loss_fn)
