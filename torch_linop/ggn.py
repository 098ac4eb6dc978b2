"""The generalized Gauss-Newton matrix ``J^T H_loss J``: exact forward-mode JVP, closed-form (or
autograd) loss Hessian on the output, one VJP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import SandwichProduct, make_leaves, stack_columns, vjp_columns
from torch_linop._checks import check_loss
from torch_linop._context import reparametrized
from torch_linop._graph_cache import GraphCachingOperator, KeptForward
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.params import ParamFilter

GGN_JVP_METHODS = (
    "auto",
    "forward",
    "double_backward",
    "finite_difference",
    "forward_difference",
)
APPROXIMATE_JVP_METHODS = ("finite_difference", "forward_difference")


def autograd_output_hvp(
    loss_fn: LossFunction, output: torch.Tensor, batch: Any, vectors: torch.Tensor
) -> torch.Tensor:
    """Output Hessian times ``vectors`` ``(k, *output.shape)`` by double backward on the loss
    alone (a small graph: loss of the detached output)."""
    leaf = output.detach().requires_grad_(True)
    loss = check_loss(loss_fn.loss(leaf, batch), "the loss of the output")
    (gradient,) = torch.autograd.grad(loss, leaf, create_graph=True)
    if not gradient.requires_grad:  # loss linear in the output
        return torch.zeros_like(vectors)
    columns = [
        torch.autograd.grad(gradient, leaf, grad_outputs=v, retain_graph=True)[0] for v in vectors
    ]
    return torch.stack(columns)


def output_hvp_of(
    loss_fn: LossFunction, batch: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss Hessian as a map ``(output, vectors) -> vectors``: closed form when known.
    The map may overwrite ``vectors`` (the operators pass their own JVPs)."""

    def middle(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        closed = loss_fn.output_hessian_vector_product_(output, batch, vectors)
        if closed is not None:
            return closed
        return autograd_output_hvp(loss_fn, output, batch, vectors)

    return middle


def finite_difference_jvps(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    params: dict[str, torch.Tensor],
    tangents: list[torch.Tensor],
    output: torch.Tensor,
    *,
    central: bool = True,
) -> torch.Tensor:
    """The k JVPs ``(k, *output.shape)`` by finite differences of forward passes (no graph).

    Central differences (``central=True``: two shifted forwards, relative error ~1e-5 in
    float32) or one-sided ones against ``output`` (the unshifted forward, which the VJP needs
    anyway: one shifted forward, about 20% cheaper, relative error ~1e-3 in float32, unusable
    in bf16). The step is sized for the parameters' dtype (see
    ``hessian_product_finite_difference``)."""
    from torch_linop._finite_difference import local_step, shifted
    from torch_linop.hessian import _norm

    theta = {name: p.detach() for name, p in params.items()}
    param_dtype = next(iter(theta.values())).dtype
    acc = torch.float64 if param_dtype == torch.float64 else torch.float32
    eps = torch.finfo(param_dtype).eps
    acc_theta = [t.to(acc) for t in theta.values()]
    dtypes = [t.dtype for t in theta.values()]
    theta_norm = _norm(acc_theta)
    jvps = []
    with torch.no_grad():
        for j in range(tangents[0].shape[0]):
            direction = [t[j].to(acc) for t in tangents]
            v_norm = _norm(direction)
            if v_norm == 0.0:
                jvps.append(torch.zeros_like(output))
                continue
            power = 1.0 / 3.0 if central else 1.0 / 2.0  # balances truncation and rounding
            step = local_step(acc_theta, direction, theta_norm, v_norm, eps, power)
            outs = []
            for sign in (1.0, -1.0) if central else (1.0,):
                moved = shifted(acc_theta, direction, sign * step, dtypes)
                with reparametrized(model, dict(zip(theta, moved))):
                    outs.append(forward().to(acc))
            if central:
                difference = (outs[0] - outs[1]).div_(2 * step)
            else:
                difference = outs[0].sub_(output.detach().to(acc)).div_(step)
            jvps.append(difference.to(output.dtype))
            del outs, difference
    return stack_columns(jvps)


def finite_difference_sandwich(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    params: dict[str, torch.Tensor],
    tangents: list[torch.Tensor],
    middle: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    central: bool = True,
    kept: KeptForward | None = None,
) -> list[torch.Tensor]:
    """``J^T M J V`` with a finite-difference JVP (see :func:`finite_difference_jvps`) and an
    exact VJP; on ``kept`` (a cached forward pass, whose graph stays) instead of a new forward."""
    if kept is None:
        leaves = make_leaves(params)
        with reparametrized(model, leaves):
            output = forward()
    else:
        leaves, output = kept.leaves, kept.output
    jvps = finite_difference_jvps(model, forward, params, tangents, output, central=central)
    cotangents = middle(output.detach(), jvps)
    del jvps  # output-sized: not alive during the backward
    leaf_list = list(leaves.values())
    return vjp_columns(output, leaf_list, cotangents, batched=False, retain_graph=kept is not None)


class GGNOperator(GraphCachingOperator):
    """Generalized Gauss-Newton matrix ``G = J^T H_loss J`` (PSD for convex losses).

    Call as ``GGNOperator(model, data, supervised_loss(F.cross_entropy))`` or, seed-style, as
    ``GGNOperator(model, data, forward_fn, loss_of_output_fn)``. ``jvp_method="auto"`` uses exact
    forward-mode AD (falling back to an exact double-backward JVP); ``"finite_difference"``
    (central) and ``"forward_difference"`` (one-sided, one forward pass fewer) are approximate
    options, never the default.

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

    ``cuda_graph=True`` (with ``cache_graph=True`` and the exact JVP, on a CUDA device) captures
    the one-column product in a CUDA graph and replays it: the dual forward's thousands of
    operations are no longer dispatched by the host (GPT-2 small on an H200: 1.87x a gradient
    instead of 2.04x at 8x512 tokens, 2.13x instead of 2.69x at 8x256). Recaptured when the
    kept graphs are rebuilt; products of several columns run uncaptured.
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
        if jvp_method not in GGN_JVP_METHODS:
            raise ValueError(f"jvp_method must be one of {GGN_JVP_METHODS}, got {jvp_method!r}")
        if cuda_graph is True and jvp_method in APPROXIMATE_JVP_METHODS:
            raise ValueError(
                f"cuda_graph=True cannot capture jvp_method={jvp_method!r}: its step is computed "
                "on the host for every vector; use the exact JVP (jvp_method='auto') with it"
            )
        self.jvp_method = jvp_method
        self._init_graph_cache(cache_graph, cuda_graph)
        self._sandwich = SandwichProduct(
            "auto" if jvp_method in APPROXIMATE_JVP_METHODS else jvp_method
        )
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, param_filter=param_filter, **kwargs)

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The map applied between J and J^T: the loss Hessian w.r.t. the output."""
        return output_hvp_of(self.loss_fn, batch)

    def _forward_of(self, batch: Any) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            return _check_output(self.loss_fn.forward(self.model, batch))

        return forward

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
        if self.jvp_method in APPROXIMATE_JVP_METHODS:
            return finite_difference_sandwich(
                self.model,
                forward,
                self.params,
                tangents,
                middle,
                central=self.jvp_method == "finite_difference",
                kept=kept,
            )
        if kept is None:
            return self._sandwich(self.model, forward, self.params, tangents, middle)
        return self._sandwich.on_kept_graph(
            self.model, forward, kept.leaves, kept.output, tangents, middle
        )


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
