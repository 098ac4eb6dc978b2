"""The Hessian of the loss: exact by double backward or forward-over-reverse, or by central
differences of gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import grads_or_zeros, make_leaves
from torch_linop._checks import check_loss
from torch_linop._context import reparametrized
from torch_linop._finite_difference import local_step, norm_of, shifted
from torch_linop._graph_cache import GraphCachingOperator
from torch_linop.losses.base import LossFunction
from torch_linop.options import ProductOptions, accepts_old_option_keywords, resolve_options
from torch_linop.params import ParamFilter
from torch_linop.products.capability import Capabilities

HESSIAN_METHODS = ("autograd", "forward", "finite_difference")


def loss_and_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    leaves: dict[str, torch.Tensor],
    batch: Any,
    *,
    create_graph: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The batch loss and its gradient w.r.t. ``leaves`` (zeros for unused parameters)."""
    with reparametrized(model, leaves):
        loss = check_loss(loss_fn(model, batch))
    leaf_list = list(leaves.values())
    grads = torch.autograd.grad(loss, leaf_list, create_graph=create_graph, allow_unused=True)
    return loss, grads_or_zeros(grads, leaf_list)


def double_backward(
    gradients: list[torch.Tensor],
    leaves: list[torch.Tensor],
    live: list[int],
    tangents: list[torch.Tensor],
    *,
    batched: bool,
    retain_graph: bool,
) -> list[torch.Tensor]:
    """``H V`` from a gradient graph: ``gradients`` are the gradients w.r.t. ``leaves[i]`` for
    ``i in live`` (those with a graph), ``tangents`` are ``(k, *param.shape)``. The columns go
    through one vmapped backward when ``batched``, else one backward each; ``retain_graph`` keeps
    the graph for later products (the cached-graph mode)."""
    num_columns = tangents[0].shape[0]
    if not live:  # the loss is linear in (or independent of) every parameter
        return [torch.zeros_like(tangent) for tangent in tangents]
    if batched and num_columns > 1:
        second = torch.autograd.grad(
            gradients,
            leaves,
            grad_outputs=[tangents[i] for i in live],
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return [torch.zeros_like(t) if s is None else s for t, s in zip(tangents, second)]
    columns = [
        torch.autograd.grad(
            gradients,
            leaves,
            grad_outputs=[tangents[i][j] for i in live],
            retain_graph=retain_graph or j < num_columns - 1,
            allow_unused=True,
        )
        for j in range(num_columns)
    ]
    # a parameter outside the graph is None in every column (allow_unused is structural)
    if num_columns == 1:
        return [
            torch.zeros_like(t) if s is None else s.unsqueeze(0)
            for t, s in zip(tangents, columns[0])
        ]
    return [
        torch.zeros_like(t) if per_column[0] is None else torch.stack(per_column)
        for t, per_column in zip(tangents, zip(*columns))
    ]


def gradient_graph(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The batch gradient with its graph (``create_graph=True``): ``(leaves, gradients, live)``
    where ``gradients[m]`` is the gradient w.r.t. ``leaves[live[m]]``; a parameter whose gradient
    has no graph (the loss is linear in it, or does not use it) has a zero Hessian row."""
    leaves = make_leaves(params)
    _, grads = loss_and_gradient(model, loss_fn, leaves, batch, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    return list(leaves.values()), [grads[i] for i in live], live


def hessian_product_autograd(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
    tangents: list[torch.Tensor],
    *,
    batched: bool,
) -> list[torch.Tensor]:
    """Per-batch ``H V`` by double backward; ``tangents`` are ``(k, *param.shape)``."""
    leaves, gradients, live = gradient_graph(model, loss_fn, params, batch)
    return double_backward(gradients, leaves, live, tangents, batched=batched, retain_graph=False)


def hessian_product_forward(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
    tangents: list[torch.Tensor],
    *,
    batched: bool,
) -> list[torch.Tensor]:
    """Per-batch ``H V`` by forward-over-reverse with ``torch.func`` (vmapped over columns)."""
    primals = {name: p.detach() for name, p in params.items()}
    names = list(primals)

    def loss_of(values: dict[str, torch.Tensor]) -> torch.Tensor:
        with reparametrized(model, values):
            return check_loss(loss_fn(model, batch), finite=False)

    gradient = torch.func.grad(loss_of)

    def hvp(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return torch.func.jvp(gradient, (primals,), (tangent,))[1]

    tangent_dict = dict(zip(names, tangents))
    if batched and tangents[0].shape[0] > 1:
        out = torch.func.vmap(hvp, randomness="same")(tangent_dict)
        return [out[name] for name in names]
    columns = [hvp({n: t[j] for n, t in tangent_dict.items()}) for j in range(tangents[0].shape[0])]
    return [torch.stack([c[name] for c in columns]) for name in names]


def hessian_product_finite_difference(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: Any,
    tangents: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Per-batch ``H v ~ (g(theta + h v) - g(theta - h v)) / 2h``.

    The step is ``eps**(1/3) * max(1, ||theta||) / ||v||``, capped so that no entry moves by
    more than ``eps**(1/3) * (|theta_i| + rms(theta))`` (torch_linop/_finite_difference.py), with
    ``eps`` of the *parameters'*
    dtype: the shifted parameters are rounded to that dtype, so a step sized for float32 would be
    lost in bf16 rounding (measured: 48% error in bf16, 2% with this step). The step, the
    direction and the difference of gradients are carried in float32 or better. The model is
    never written. Typical relative error: ~1e-10 in float64, ~1e-5 in float32, ~1e-2 in bf16.
    """
    theta = [p.detach() for p in params.values()]
    names = list(params)
    acc_dtype = torch.float64 if theta[0].dtype == torch.float64 else torch.float32
    eps = torch.finfo(theta[0].dtype).eps
    acc_theta = [t.to(acc_dtype) for t in theta]
    dtypes = [t.dtype for t in theta]
    theta_norm = norm_of(acc_theta)
    results = [torch.zeros_like(t) for t in tangents]
    for j in range(tangents[0].shape[0]):
        direction = [t[j].to(acc_dtype) for t in tangents]
        v_norm = norm_of(direction)
        if v_norm == 0.0:
            continue
        step = local_step(acc_theta, direction, theta_norm, v_norm, eps, 1.0 / 3.0)
        grads = []
        for sign in (1.0, -1.0):
            moved = shifted(acc_theta, direction, sign * step, dtypes)
            leaves = {name: m.requires_grad_(True) for name, m in zip(names, moved)}
            _, g = loss_and_gradient(model, loss_fn, leaves, batch, create_graph=False)
            grads.append([x.to(acc_dtype) for x in g])
        for result, plus, minus in zip(results, *grads):
            result[j] = ((plus - minus) / (2.0 * step)).to(result.dtype)
    return results


@dataclass
class _BatchGraph:
    """One batch's kept gradient graph (see :func:`gradient_graph`) and its weight."""

    weight: float
    leaves: list[torch.Tensor]
    gradients: list[torch.Tensor]
    live: list[int]


class HessianOperator(GraphCachingOperator):
    """Hessian of the dataset loss w.r.t. the selected parameters.

    ``method``: ``"autograd"`` (double backward, default), ``"forward"`` (forward-over-reverse
    with ``torch.func``; needs forward-mode AD in every layer), or ``"finite_difference"``
    (central differences of gradients: about 2x a gradient, relative error ~1e-4 in float32,
    for setups where double backward is impractical). One batch graph is alive at a time.

    ``cache_graph=True`` (``method="autograd"`` only) computes each batch's gradient once, with
    its graph, and keeps it: every later product is one backward through the kept graphs, with
    no forward pass and no first backward (measured 1.3-2x a gradient instead of ~2.5-3.5x).
    The price is memory: one graph per batch stays alive between products, holding that batch's
    activations and the gradient's graph (about what one uncached product needs at its peak,
    times the number of batches), until the cache is rebuilt, :meth:`clear_cache` is called or
    the operator is deleted. It suits one or a few batches that fit in memory side by side.
    The products are the same numbers as without the cache: the graphs are rebuilt at the next
    product when a parameter or buffer of the model changes (in place, by optimiser steps or
    ``copy_``, or by replacement), when a module switches between train and eval mode, when a
    tensor in a batch of a list/tuple ``data`` changes (batches of tensors, tuples, lists, dicts)
    or the operator's data, loss or parameters are replaced. Writes that bypass PyTorch's
    version counters cannot be seen: after changing values through ``param.data`` (or a numpy
    view), or the contents of a ``DataLoader``'s dataset, call :meth:`clear_cache`. A product
    that raises drops the cache.

    ``options=ProductOptions(...)`` sets the rarely needed options (how many batches, a process
    group, ...: :class:`~torch_linop.options.ProductOptions`); with ``cuda_graph=True`` among
    them (and ``cache_graph=True``, on a CUDA device) the operator captures the one-column
    product in a CUDA graph and replays it, so the host no longer dispatches it operation by
    operation (recaptured when the kept graphs are rebuilt; see ``torch_linop/_cuda_graph.py``).
    """

    @accepts_old_option_keywords
    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        *,
        param_filter: ParamFilter | None = None,
        method: str = "autograd",
        cache_graph: bool = False,
        options: ProductOptions | None = None,
    ) -> None:
        options = resolve_options(options)
        if method not in HESSIAN_METHODS:
            raise ValueError(f"method must be one of {HESSIAN_METHODS}, got {method!r}")
        if cache_graph is True and method != "autograd":
            raise ValueError(
                f"cache_graph=True needs method='autograd', got method={method!r}: the kept graph "
                "is the double-backward gradient graph. Use method='autograd' with the cache, "
                "or cache_graph=False"
            )
        self.method = method
        self._init_graph_cache(cache_graph, options.cuda_graph)
        self.capabilities = Capabilities()
        # the k columns in one pass: vmap over forward-over-reverse (method="forward") or one
        # is_grads_batched backward (double backward), each probed once
        self._batched_columns = (
            self.capabilities.vmap_jvp
            if method == "forward"
            else self.capabilities.batched_backward
        )
        super().__init__(model, data, loss_fn, param_filter=param_filter, options=options)

    # ----------------------------------------------------------------- cached-graph mode
    def _build_graph(self, weight: float, batch: Any) -> _BatchGraph:
        return _BatchGraph(weight, *gradient_graph(self.model, self.loss_fn, self.params, batch))

    def _cached_product(
        self, graph: _BatchGraph, tangents: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        def product(batched: bool) -> list[torch.Tensor]:
            return double_backward(
                graph.gradients,
                graph.leaves,
                graph.live,
                tangents,
                batched=batched,
                retain_graph=True,
            )

        if tangents[0].shape[0] == 1:
            return product(batched=False)
        # a failed batched backward leaves the graph retained: the loop runs on it
        return self._batched_columns.choose(lambda: product(True), lambda: product(False))

    # ----------------------------------------------------------------- per-batch products
    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.method == "finite_difference":
            return hessian_product_finite_difference(
                self.model, self.loss_fn, self.params, batch, tangents
            )
        product = hessian_product_forward if self.method == "forward" else hessian_product_autograd

        def columns(batched: bool) -> list[torch.Tensor]:
            return self._exact(product, batch, tangents, batched)

        if tangents[0].shape[0] == 1:
            return columns(batched=False)
        return self._batched_columns.choose(lambda: columns(True), lambda: columns(False))

    def _exact(
        self, product: Any, batch: Any, tangents: list[torch.Tensor], batched: bool
    ) -> list[torch.Tensor]:
        try:
            return product(self.model, self.loss_fn, self.params, batch, tangents, batched=batched)
        except RuntimeError as error:
            if self.method == "forward" and "ZeroTensors are immutable" in str(error):
                raise RuntimeError(
                    "method='forward' hit a PyTorch forward-over-reverse bug in the loss (for "
                    "example F.mse_loss(reduction='mean'), PyTorch issue #123996): use "
                    "method='autograd', supervised_loss(F.mse_loss) (which avoids it), or "
                    "write the loss as ((output - target) ** 2).mean()"
                ) from error
            raise
