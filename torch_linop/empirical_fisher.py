"""The empirical Fisher ``(1/N) sum_i g_i g_i^T`` without per-sample gradients: a sandwich product
(:mod:`torch_linop.products`) on the per-sample loss vector, ``G v`` from one JVP of it,
``G^T (G v)`` from one VJP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torch_linop.ggn import SandwichOperator
from torch_linop.products.jvp import JVP_METHODS
from torch_linop.products.middle import empirical_fisher_middle

# every JVP of the GGN applies to the per-sample losses: exact forward mode (with the probed
# double-backward fallback under "auto"), double backward, central or one-sided differences
EF_JVP_METHODS = JVP_METHODS


class EmpiricalFisherOperator(SandwichOperator):
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

    _VALID_JVP_METHODS = EF_JVP_METHODS

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The map applied between J and J^T: the per-sample losses' scaling (batch-independent)."""
        return empirical_fisher_middle(self.loss_fn)

    def _forward_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        """The per-sample losses of ``batch``: J is their Jacobian."""

        def per_sample_losses() -> torch.Tensor:
            output = self.loss_fn.forward(self.model, batch)
            return self.loss_fn.per_sample_losses(output, batch)

        return per_sample_losses
