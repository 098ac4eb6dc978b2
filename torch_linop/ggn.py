"""The generalized Gauss-Newton matrix ``J^T H_loss J``: a sandwich product
(:mod:`torch_linop.products`) of the JVP strategy named by ``jvp_method`` and the loss Hessian
w.r.t. the output (closed form, or autograd) as the middle."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop._graph_cache import GraphCachingOperator, KeptForward
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.options import ProductOptions, accepts_old_option_keywords, resolve_options
from torch_linop.params import ParamFilter
from torch_linop.products.capability import Capabilities
from torch_linop.products.jvp import JVP_METHODS, make_jvp
from torch_linop.products.middle import autograd_output_hvp, output_hvp_of
from torch_linop.products.sandwich import Sandwich

__all__ = [
    "GGN_JVP_METHODS",
    "GGNOperator",
    "autograd_output_hvp",
    "output_hvp_of",
]

GGN_JVP_METHODS = JVP_METHODS


class SandwichOperator(GraphCachingOperator):
    """``J^T M J`` of a forward pass's output: the base of the GGN (output = the model's output,
    M = the loss Hessian) and the empirical Fisher (output = the per-sample losses, M = their
    scaling). Subclasses supply :meth:`_forward_of` and :meth:`middle`; the JVP strategy, the
    sandwich and the kept-graph plumbing are chosen here, once, at construction."""

    _VALID_JVP_METHODS: tuple[str, ...] = JVP_METHODS

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
            valid=self._VALID_JVP_METHODS,
            cuda_graph=options.cuda_graph,
        )
        self._init_graph_cache(cache_graph, options.cuda_graph)
        self._sandwich = Sandwich(jvp, self.capabilities.batched_backward)
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, param_filter=param_filter, options=options)

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The map applied between J and J^T for ``batch``."""
        raise NotImplementedError

    def _forward_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        """The forward pass whose Jacobian J is sandwiched, as a closure over ``batch``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- cached-graph mode
    def _build_graph(self, weight: float, batch: Any) -> KeptForward:
        return self._kept_forward(weight, batch, self._forward_of(batch))

    def _cached_product(
        self, graph: KeptForward, tangents: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        return self._product(graph.batch, tangents, graph)

    # ----------------------------------------------------------------- per-batch products
    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._product(batch, tangents, None)

    def _product(
        self, batch: Any, tangents: list[torch.Tensor], kept: KeptForward | None
    ) -> list[torch.Tensor]:
        """``J^T M J V`` for one batch, on its kept forward pass when there is one."""
        forward = self._forward_of(batch)
        middle = self.middle(batch)  # per product: the MC Fisher draws its targets here
        if kept is None:
            return self._sandwich(self.model, forward, self.params, tangents, middle)
        return self._sandwich.on_kept_graph(
            self.model, forward, kept.leaves, kept.output, tangents, middle
        )


class GGNOperator(SandwichOperator):
    """Generalized Gauss-Newton matrix ``G = J^T H_loss J`` (PSD for convex losses).

    Call as ``GGNOperator(model, data, supervised_loss(F.cross_entropy))`` or, seed-style, as
    ``GGNOperator(model, data, forward_fn, loss_of_output_fn)``. ``jvp_method="auto"`` uses exact
    forward-mode AD, falling back to an exact double-backward JVP where the model has no
    forward-mode AD (probed once, at the first product: see ``capabilities``);
    ``"finite_difference"`` (central) and ``"forward_difference"`` (one-sided, one forward pass
    fewer) are approximate options, never the default. The product is composed at construction
    from a JVP strategy and the loss Hessian as its middle (:mod:`torch_linop.products`).

    ``cache_graph=True`` runs each batch's forward pass once, with its graph, and keeps it:
    every later product is a JVP that records no graph (a dual forward, or the shifted forwards
    of a finite-difference JVP) and one backward through the kept graph. The numbers are the
    same as without the cache (the kept graph is built with the model's own attention kernels,
    so on fused attention they agree to rounding); the price is one batch's activations per
    batch kept between products. It is also the lighter mode: without it, a product's
    dual-number forward records the backward graph and, with it, the tangent computations
    (about 3x a gradient's peak memory on GPT-2 small; 1.4x with the cache, kept graph
    included). The cache is rebuilt or dropped as for ``HessianOperator(cache_graph=True)``
    (parameter, buffer, mode and data changes are seen; :meth:`clear_cache` for writes through
    ``param.data``; a product that raises drops it).

    ``options=ProductOptions(cuda_graph=True)`` (with ``cache_graph=True`` and the exact JVP, on
    a CUDA device) captures the one-column product in a CUDA graph and replays it: the dual
    forward's thousands of operations are no longer dispatched by the host (GPT-2 small on an
    H200: 1.87x a gradient instead of 2.04x at 8x512 tokens, 2.13x instead of 2.69x at 8x256).
    Recaptured when the kept graphs are rebuilt; products of several columns run uncaptured.
    The other rarely needed options (how many batches, a process group, ...) are set by
    ``options=`` too (:class:`~torch_linop.options.ProductOptions`).
    """

    _VALID_JVP_METHODS = GGN_JVP_METHODS

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The map applied between J and J^T: the loss Hessian w.r.t. the output."""
        return output_hvp_of(self.loss_fn, batch)

    def _forward_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            return _check_output(self.loss_fn.forward(self.model, batch))

        return forward


def _check_output(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the loss's forward() must return a tensor (e.g. the logits), got "
            f"{type(output).__name__}; for HuggingFace models use hf_lm_loss()"
        )
    return output


def _require_split(loss: LossFunction, operator: str) -> None:
    if type(loss).forward is LossFunction.forward:
        raise TypeError(
            f"{operator} needs a loss that separates the model's forward pass from the loss "
            "(J^T H_loss J needs the output); use supervised_loss(criterion), hf_lm_loss(), "
            "pass forward_fn and loss_of_output_fn, or subclass torch_linop.LossFunction"
        )
