"""Exact forward-mode directional derivatives through FSDP2 (``fully_shard``) modules.

FSDP2 all-gathers each block's parameters into plain unsharded tensors in its forward pre-hook,
outside autograd, so ``torch.func.jvp`` on the sharded DTensors fails (``NotImplementedError:
Operator aten._has_same_storage_numel.default does not have a sharding strategy registered``).
:func:`sharded_tangents` instead hooks every FSDP block: after FSDP's own pre-hook has
all-gathered the block's parameters, the block's selected parameters are replaced by dual tensors
whose tangent is the all-gathered direction of that block (freed with the block), and restored
before FSDP's post-hook reshards them. The forward then carries exact tangents, so
``unpack_dual(output).tangent`` is ``J v``.

FSDP's ``RegisterPostBackwardFunction`` (applied to a block's inputs when grad mode is on) has no
forward-mode rule (``RuntimeError: A custom Function's forward is returning a view (or an input
as-is) but the jvp is not returning a view.``), so the tangents of a block's inputs are taken off
before FSDP's pre-hook and put back after it. With grad mode on, the tangents stay differentiable
(reverse-over-forward): backpropagating the loss's tangent ``g(theta)^T v`` through FSDP's backward
gives the exact Hessian-vector product ``H v``, reduce-scattered by FSDP like any gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils._pytree import tree_flatten, tree_unflatten

_TANGENTS = "_torch_linop_input_tangents"


def _fsdp_pre_backward(module: nn.Module) -> Any:
    state = getattr(module, "_get_fsdp_state", lambda: None)()
    hook = getattr(state, "_pre_backward", None)
    if hook is None:
        raise RuntimeError(
            "this torch version's FSDP2 has no per-block pre-backward hook "
            "(FSDPState._pre_backward); exact reverse-over-forward products cannot run, use "
            "method='finite_difference'"
        )
    return hook


def managing_blocks(model: nn.Module, names: list[str]) -> dict[str, str]:
    """For each parameter name, the qualified name of the FSDP block that all-gathers it: the
    innermost ``fully_shard``-ed module whose name is a prefix of the parameter's."""
    blocks = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    managers = {}
    for name in names:
        candidates = [b for b in blocks if b == "" or name.startswith(b + ".")]
        managers[name] = max(candidates, key=len)
    return managers


def _gather_rows(local: torch.Tensor, dim0: int, world: int, group: Any) -> torch.Tensor:
    """The full tensor from every rank's dim-0 shard (``torch.chunk`` rule, padded chunks)."""
    chunk = -(-dim0 // world) if dim0 else 0
    padded = torch.zeros(chunk, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat(gathered)[:dim0]


def _without_tangents(tree: Any) -> tuple[Any, list[torch.Tensor | None]]:
    leaves, spec = tree_flatten(tree)
    primals, tangents = [], []
    for leaf in leaves:
        tangent = fwAD.unpack_dual(leaf).tangent if isinstance(leaf, torch.Tensor) else None
        tangents.append(tangent)
        primals.append(leaf if tangent is None else fwAD.unpack_dual(leaf).primal)
    return tree_unflatten(primals, spec), tangents


def _with_tangents(tree: Any, tangents: list[torch.Tensor | None]) -> Any:
    leaves, spec = tree_flatten(tree)
    if len(leaves) != len(tangents):
        raise RuntimeError(
            f"a forward pre-hook changed the number of inputs of an FSDP block ({len(tangents)} "
            f"-> {len(leaves)}); forward-mode products cannot follow the tangents"
        )
    duals = [
        leaf if tangent is None else fwAD.make_dual(leaf, tangent)
        for leaf, tangent in zip(leaves, tangents)
    ]
    return tree_unflatten(duals, spec)


@contextlib.contextmanager
def sharded_tangents(
    model: nn.Module,
    directions: dict[str, torch.Tensor],
    rows: dict[str, int],
    *,
    group: Any,
    world: int,
) -> Iterator[None]:
    """Run ``model``'s forwards inside this context with tangents: ``directions`` maps selected
    parameter names to this rank's dim-0 shard of their direction, ``rows`` to their global number of
    rows. Inside, outputs are dual
    tensors (read ``torch.autograd.forward_ad.unpack_dual(out).tangent``); every rank must run
    the same forwards (each block all-gathers its direction, a collective)."""
    managers = managing_blocks(model, list(directions))
    blocks = dict(model.named_modules())
    owners = {}
    for name in directions:
        module_name, _, leaf = name.rpartition(".")
        owners[name] = (model.get_submodule(module_name), leaf)
    managed: dict[str, list[str]] = {}
    for name, block in managers.items():
        managed.setdefault(block, []).append(name)

    swapped: dict[str, torch.Tensor] = {}

    def take_tangents(module: nn.Module, args: Any, kwargs: Any) -> Any:
        (args, kwargs), tangents = _without_tangents((args, kwargs))
        # passed to FSDP's pre-hook as an extra keyword: with grad mode on, FSDP routes them
        # through its post-backward function along with the inputs, so its reduce-scatter waits
        # for the gradients that flow back through the tangents
        return args, {**kwargs, _TANGENTS: tangents}

    def give_tangents(block_name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            kwargs = dict(kwargs)
            args, kwargs = _with_tangents((args, kwargs), kwargs.pop(_TANGENTS))
            for name in managed.get(block_name, []):
                owner, leaf = owners[name]
                unsharded = owner._parameters[leaf]
                assert unsharded is not None
                full = _gather_rows(directions[name], rows[name], world, group)
                swapped[name] = unsharded
                owner._parameters[leaf] = fwAD.make_dual(unsharded, full.to(unsharded.dtype))
            return args, kwargs

        return hook

    def restore(block_name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for name in managed.get(block_name, []):
                if name in swapped:
                    owner, leaf = owners[name]
                    owner._parameters[leaf] = swapped.pop(name)  # type: ignore[assignment]
            return output

        return hook

    def unshard_before_tangent_backward(module: nn.Module, args: Any, output: Any) -> Any:
        """FSDP re-all-gathers a block's parameters in a hook on the gradient of its outputs;
        gradients that reach the block through the outputs' tangents must trigger it too."""
        if torch.is_grad_enabled():
            pre_backward = _fsdp_pre_backward(module)
            leaves, _ = tree_flatten(output)
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    tangent = fwAD.unpack_dual(leaf).tangent
                    if tangent is not None and tangent.requires_grad:
                        tangent.register_hook(pre_backward)
        return output

    handles = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(fwAD.dual_level())
        try:
            for block_name, module in blocks.items():
                if not _is_fsdp_block(module):
                    continue
                # FSDP's pre-hook was prepended when the block was sharded: prepending again
                # runs ours first; appending runs ours after FSDP's all-gather.
                handles.append(
                    module.register_forward_pre_hook(take_tangents, prepend=True, with_kwargs=True)
                )
                handles.append(
                    module.register_forward_pre_hook(give_tangents(block_name), with_kwargs=True)
                )
                handles.append(module.register_forward_hook(restore(block_name), prepend=True))
                handles.append(module.register_forward_hook(unshard_before_tangent_backward))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name, unsharded in swapped.items():  # a forward that raised midway
                owner, leaf = owners[name]
                owner._parameters[leaf] = unsharded  # type: ignore[assignment]
            swapped.clear()


def _is_fsdp_block(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _copy_exp_output(tensor: torch.Tensor) -> torch.Tensor:
    grad_fn = tensor.grad_fn
    if grad_fn is not None and type(grad_fn).__name__ == "ExpBackward0":
        return tensor.clone()
    return tensor


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def exp_outputs_copied() -> Iterator[None]:
    """Work around pytorch/pytorch#162350 for reverse-over-forward products: the forward-mode
    rule of ``logsumexp`` (used by softmax, log_softmax and cross-entropy) multiplies the output
    of an ``exp`` in place after autograd saved it, and the backward then fails with
    ``RuntimeError: one of the variables needed for gradient computation has been modified by an
    inplace operation: [...] which is output 0 of ExpBackward0``. Saving a copy of every ``exp``
    output (the value before the in-place product, which is what its backward needs) avoids it;
    the copies replace the originals in the graph, so memory grows only by the ``exp`` outputs
    the forward rule frees right after."""
    with torch.autograd.graph.saved_tensors_hooks(_copy_exp_output, _same):
        yield
