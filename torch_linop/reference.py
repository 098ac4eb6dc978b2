"""Dense reference matrices built with ``torch.func`` on small models, for checking operators.

These materialise ``(n, n)`` matrices: use them on tiny models only (tests, sanity checks).
They follow the operators' conventions (sample-weighted mean over batches, ``reduction="sum"``
losses summed) but share none of their product code.

Not for BatchNorm in train mode: there ``torch.func.hessian``/``jacrev`` (vmapped transforms)
return wrong numbers in torch 2.13 while a single ``jvp``/``vjp`` is right; check such models
against central differences of gradients instead (as tests/core does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev

from torch_linop.data import move_to_device
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.params import ParamFilter, select_parameters


def _setup(model: nn.Module, param_filter: ParamFilter | None):
    params = select_parameters(model, param_filter)
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(names, torch.split(vector, sizes), shapes)}

    return flat, unflatten, next(iter(params.values())).device


def _weights(loss: LossFunction, batches: list[Any]) -> list[float]:
    if loss.reduction == "sum":
        return [1.0] * len(batches)
    masses = [loss.batch_weight(b) for b in batches]  # class-weighted CE: total class weight
    counts = [loss.num_samples(b) if m is None else m for b, m in zip(batches, masses)]
    total = sum(counts)
    return [c / total for c in counts]


def _call(model: nn.Module, values: dict[str, torch.Tensor], fn: Callable[[], Any]) -> Any:
    from torch_linop._context import differentiable_attention, reparametrized

    # torch.func.hessian is forward-over-reverse: the fused SDPA kernels have no forward-mode AD
    with differentiable_attention(), reparametrized(model, values):
        return fn()


def dense_hessian(
    model: nn.Module, data: Iterable[Any], loss_fn: Any, param_filter: ParamFilter | None = None
) -> torch.Tensor:
    """The Hessian of the dataset loss as a dense matrix."""
    loss = as_loss_function(loss_fn)
    flat, unflatten, device = _setup(model, param_filter)
    batches = [move_to_device(b, device) for b in data]
    weights = _weights(loss, batches)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=device)
    for weight, batch in zip(weights, batches):

        def loss_of(vector: torch.Tensor, batch: Any = batch) -> torch.Tensor:
            return _call(model, unflatten(vector), lambda: loss(model, batch))

        # forward-over-reverse: torch 2.13's reverse-over-reverse (jacrev of grad, which
        # torch.func.hessian uses) gets layer_norm's weight-input block wrong
        total += weight * jacfwd(grad(loss_of))(flat)
    return total.detach()


def dense_ggn(
    model: nn.Module, data: Iterable[Any], loss_fn: Any, param_filter: ParamFilter | None = None
) -> torch.Tensor:
    """The GGN ``sum_b w_b J_b^T H_b J_b`` as a dense matrix (Jacobians by ``jacrev``)."""
    loss = as_loss_function(loss_fn)
    flat, unflatten, device = _setup(model, param_filter)
    batches = [move_to_device(b, device) for b in data]
    weights = _weights(loss, batches)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=device)
    for weight, batch in zip(weights, batches):

        def output_of(vector: torch.Tensor, batch: Any = batch) -> torch.Tensor:
            return _call(model, unflatten(vector), lambda: loss.forward(model, batch))

        output = output_of(flat).detach()
        jacobian = jacrev(output_of)(flat).reshape(output.numel(), -1)
        out_hessian = hessian(
            lambda o, batch=batch, like=output: loss.loss(o.view_as(like), batch)
        )(output.reshape(-1))
        total += weight * jacobian.T @ out_hessian @ jacobian
    return total.detach()


def dense_empirical_fisher(
    model: nn.Module, data: Iterable[Any], loss_fn: Any, param_filter: ParamFilter | None = None
) -> torch.Tensor:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` (or the sum) from explicit per-sample
    gradients (``jacrev`` of the per-sample loss vector)."""
    loss = as_loss_function(loss_fn)
    flat, unflatten, device = _setup(model, param_filter)
    batches = [move_to_device(b, device) for b in data]
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=device)
    count = 0
    for batch in batches:

        def losses_of(vector: torch.Tensor, batch: Any = batch) -> torch.Tensor:
            return _call(
                model,
                unflatten(vector),
                lambda: loss.per_sample_losses(loss.forward(model, batch), batch),
            )

        gradients = jacrev(losses_of)(flat)
        total += gradients.T @ gradients
        count += gradients.shape[0]
    return (total / count if loss.reduction == "mean" else total).detach()
