"""``J^T M J V`` for one batch from two parts chosen when the operator is built: how the JVP is
taken (:mod:`torch_linop.products.jvp`) and the middle map M
(:mod:`torch_linop.products.middle`), with one VJP (batched where the model allows it, probed
once). Used by the GGN, the MC Fisher and the empirical Fisher; on a kept forward pass
(``cache_graph=True``) through :meth:`Sandwich.on_kept_graph`.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_linop import _autodiff
from torch_linop._autodiff import make_leaves
from torch_linop.products.capability import Capability
from torch_linop.products.jvp import JVP, Forward
from torch_linop.products.middle import MiddleMap


class Sandwich:
    """``J^T M J V`` with the JVP strategy ``jvp``; ``batched_backward`` says (once probed)
    whether the k cotangents go through one batched backward."""

    def __init__(self, jvp: JVP, batched_backward: Capability) -> None:
        self.jvp = jvp
        self.batched_backward = batched_backward

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        params: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        middle: MiddleMap,
    ) -> list[torch.Tensor]:
        """The product on a fresh forward pass; ``tangents`` are ``(k, *param.shape)``."""
        leaves = make_leaves(params)
        jvps, output = self.jvp(model, forward, leaves, tangents, None)
        cotangents = middle(output.detach(), jvps)
        del jvps  # output-sized (the logits of a language model): not alive during the backward
        return self._vjp(output, list(leaves.values()), cotangents, retain_graph=False)

    def on_kept_graph(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        output: torch.Tensor,
        tangents: list[torch.Tensor],
        middle: MiddleMap,
    ) -> list[torch.Tensor]:
        """The product on a kept ``output`` (a function of ``leaves`` with its graph): JVPs that
        record no graph, then one VJP that keeps the graph for the next product."""
        jvps, _ = self.jvp(model, forward, leaves, tangents, output)
        cotangents = middle(output.detach(), jvps)
        del jvps  # output-sized: not alive during the backward
        return self._vjp(output, list(leaves.values()), cotangents, retain_graph=True)

    def _vjp(
        self,
        output: torch.Tensor,
        leaf_list: list[torch.Tensor],
        cotangents: torch.Tensor,
        *,
        retain_graph: bool,
    ) -> list[torch.Tensor]:
        def columns(batched: bool) -> list[torch.Tensor]:
            return _autodiff.vjp_columns(
                output, leaf_list, cotangents, batched=batched, retain_graph=retain_graph
            )

        if cotangents.shape[0] == 1:
            return columns(batched=False)
        return self.batched_backward.choose(lambda: columns(True), lambda: columns(False))
