"""Autodiff primitives of the per-batch products: leaves, VJPs of k cotangents, JVPs by one dual
forward (with or without the output's graph) or by double backward.

The products are composed from these in :mod:`torch_linop.products`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from torch_linop._context import reparametrized


def _is_oom(error: BaseException) -> bool:
    """Whether an error is an out-of-memory error (torch raises some as plain RuntimeErrors)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def make_leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached views of the parameters that require grad: autograd leaves, no copy."""
    return {name: param.detach().requires_grad_(True) for name, param in params.items()}


def grads_or_zeros(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Replace ``None`` (a parameter the output does not depend on) by zeros."""
    return [torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, like)]


def vjp_columns(
    output: torch.Tensor,
    leaves: list[torch.Tensor],
    cotangents: torch.Tensor,
    *,
    batched: bool,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """``J^T u`` for each of the k cotangents ``(k, *output.shape)``; returns ``(k, *p.shape)``.
    ``retain_graph`` keeps the output's graph for later products (the cached-graph mode)."""
    num_columns = cotangents.shape[0]
    if num_columns > 1 and batched:
        grads = torch.autograd.grad(
            output,
            leaves,
            grad_outputs=cotangents,
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return [
            torch.zeros((num_columns, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
            if g is None
            else g
            for g, leaf in zip(grads, leaves)
        ]
    columns = []
    for j in range(num_columns):
        grads = torch.autograd.grad(
            output,
            leaves,
            grad_outputs=cotangents[j],
            retain_graph=retain_graph or j < num_columns - 1,
            allow_unused=True,
        )
        columns.append(grads_or_zeros(grads, leaves))
    # one column: views, not a parameter-sized copy (the data loop copies once, into its result)
    return [stack_columns(list(per_param)) for per_param in zip(*columns)]


def stack_columns(columns: list[torch.Tensor]) -> torch.Tensor:
    """``(k, *shape)`` from k tensors; one column is a view, not a copy (a language model's JVP
    is logits-sized)."""
    return columns[0].unsqueeze(0) if len(columns) == 1 else torch.stack(columns)


def forward_with_tangent(
    forward: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    tangent: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass with dual numbers: the output (with its autograd graph) and ``J v``."""
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
        with reparametrized(model, duals):
            dual_output = forward()
        primal, jvp = fwAD.unpack_dual(dual_output)
        if jvp is None:
            jvp = torch.zeros_like(primal)
        # the primal view must outlive the dual level: keep a differentiable alias of it
        return primal.view_as(primal), jvp.detach()


def jvp_without_graph(
    forward: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    tangent: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``J v`` by one dual forward that records no autograd graph. With the leaves requiring
    grad, a recorded dual forward also records the tangent computations (forward-mode formulas
    are differentiable), which holds their inputs until the level ends: about three times a
    gradient's memory on a transformer. Without a graph only the JVP remains."""
    with torch.no_grad(), fwAD.dual_level():
        duals = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
        with reparametrized(model, duals):
            dual_output = forward()
        primal, jvp = fwAD.unpack_dual(dual_output)
        return torch.zeros_like(primal) if jvp is None else jvp


def double_backward_jvp(
    output: torch.Tensor, leaves: list[torch.Tensor], tangent: list[torch.Tensor]
) -> torch.Tensor:
    """``J v`` without forward-mode AD: differentiate the linear map ``u -> J^T u`` in ``u``."""
    dummy = torch.zeros_like(output, requires_grad=True)
    grads = torch.autograd.grad(
        output, leaves, grad_outputs=dummy, create_graph=True, allow_unused=True
    )
    pairs = [(g, t) for g, t in zip(grads, tangent) if g is not None and g.requires_grad]
    if not pairs:
        return torch.zeros_like(output)
    (jvp,) = torch.autograd.grad(
        [g for g, _ in pairs],
        dummy,
        grad_outputs=[t for _, t in pairs],
        retain_graph=True,
        allow_unused=True,
    )
    return torch.zeros_like(output) if jvp is None else jvp


def double_backward_jvps(
    output: torch.Tensor, leaves: list[torch.Tensor], tangents: list[torch.Tensor], *, batched: bool
) -> torch.Tensor:
    """The k JVPs ``(k, *output.shape)`` of ``tangents`` (each ``(k, *leaf.shape)``) by double
    backward: one ``create_graph`` backward shared by all columns, then the k derivatives of
    ``<J^T u, v_j>`` in ``u`` (vmapped over columns when ``batched``)."""
    num_columns = tangents[0].shape[0]
    dummy = torch.zeros_like(output, requires_grad=True)
    grads = torch.autograd.grad(
        output, leaves, grad_outputs=dummy, create_graph=True, allow_unused=True
    )
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    zeros = torch.zeros((num_columns, *output.shape), dtype=output.dtype, device=output.device)
    if not live:
        return zeros
    outputs = [grads[i] for i in live]
    if batched and num_columns > 1:
        (jvps,) = torch.autograd.grad(
            outputs,
            dummy,
            grad_outputs=[tangents[i] for i in live],
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        return zeros if jvps is None else jvps
    for j in range(num_columns):
        (jvp,) = torch.autograd.grad(
            outputs,
            dummy,
            grad_outputs=[tangents[i][j] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        if jvp is not None:
            zeros[j] = jvp
    return zeros


def _lacks_forward_ad(error: BaseException) -> bool:
    """Whether an error names forward-mode AD. Used only by ``curvlinops.jacobian``'s explicit
    Jacobian operator; the curvature products probe forward-mode AD once instead
    (:mod:`torch_linop.products.capability`)."""
    message = str(error).lower()
    return any(key in message for key in ("forward ad", "forward-mode", "forward_ad", "jvp"))
