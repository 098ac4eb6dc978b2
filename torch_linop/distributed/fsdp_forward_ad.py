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
import torch.nn.functional as F
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
    parameter names to this rank's dim-0 shard of their direction, ``rows`` to their global
    number of rows. Inside, outputs are dual tensors (read
    ``torch.autograd.forward_ad.unpack_dual(out).tangent``); every rank must run the same
    forwards (each block all-gathers its direction, a collective). A parameter shared by several
    modules (tied embeddings) gets its tangent in every one of them."""
    managers = managing_blocks(model, list(directions))
    blocks = dict(model.named_modules())
    owners = _owners(model, list(directions))
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
                first, first_leaf = owners[name][0]
                unsharded = first._parameters[first_leaf]
                assert unsharded is not None
                full = _gather_rows(directions[name], rows[name], world, group)
                swapped[name] = unsharded
                dual = fwAD.make_dual(unsharded, full.to(unsharded.dtype))
                for owner, leaf in owners[name]:
                    owner._parameters[leaf] = dual  # type: ignore[assignment]
            return args, kwargs

        return hook

    def restore(block_name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for name in managed.get(block_name, []):
                if name in swapped:
                    unsharded = swapped.pop(name)
                    for owner, leaf in owners[name]:
                        owner._parameters[leaf] = unsharded  # type: ignore[assignment]
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
                for owner, leaf in owners[name]:
                    owner._parameters[leaf] = unsharded  # type: ignore[assignment]
            swapped.clear()


def _owners(model: nn.Module, names: list[str]) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every ``(module, attribute)`` that holds each named parameter: tied parameters are
    registered under several names, and FSDP sets its unsharded tensor on all of them."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for full_name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, leaf = full_name.rpartition(".")
        holders.setdefault(id(param), []).append((model.get_submodule(module_name), leaf))
    owners = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        current = model.get_submodule(module_name)._parameters[leaf]
        owners[name] = holders[id(current)]
    return owners


def _is_fsdp_block(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _copy_exp_output(tensor: torch.Tensor) -> torch.Tensor:
    grad_fn = tensor.grad_fn
    if grad_fn is not None and type(grad_fn).__name__ == "ExpBackward0":
        return tensor.clone()
    return tensor


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _layer_norm(
    input: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
) -> torch.Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    dims = tuple(range(-len(tuple(shape)), 0))
    mean = input.mean(dims, keepdim=True)
    centered = input - mean
    variance = (centered * centered).mean(dims, keepdim=True)
    output = centered * torch.rsqrt(variance + eps)
    if weight is not None:
        output = output * weight
    if bias is not None:
        output = output + bias
    return output


def _batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    batch_statistics = training or running_mean is None or running_var is None
    if batch_statistics and running_mean is not None:
        with torch.no_grad():  # the running statistics move exactly as in F.batch_norm
            F.batch_norm(
                fwAD.unpack_dual(input).primal.detach(),
                running_mean,
                running_var,
                None,
                None,
                True,
                0.0 if momentum is None else momentum,
                eps,
            )
    shape = [1, -1] + [1] * (input.dim() - 2)
    if batch_statistics:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        centered = input - mean
        variance = (centered * centered).mean(dims, keepdim=True)
    else:
        assert running_mean is not None and running_var is not None
        centered = input - running_mean.reshape(shape)
        variance = running_var.reshape(shape)
    output = centered * torch.rsqrt(variance + eps)
    if weight is not None:
        output = output * weight.reshape(shape)
    if bias is not None:
        output = output + bias.reshape(shape)
    return output


class _CompositeNorms(torch.overrides.TorchFunctionMode):
    """Layer and batch normalisation from elementary operations, whose forward-mode rules are
    differentiable: the fused kernels' forward-mode rules read the saved mean and inverse
    standard deviation, which carry no gradient, so backpropagating a tangent through them
    drops terms (pytorch/pytorch#196700: a wrong second-order JVP of ``layer_norm``; measured
    30% errors on a reverse-over-forward HVP through ``layer_norm``, ``batch_norm`` in training
    mode and ``instance_norm``)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.instance_norm:
            raise NotImplementedError(
                "instance_norm has a wrong reverse-over-forward derivative in torch "
                "(pytorch/pytorch#196700); use method='finite_difference' for this model"
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def reverse_over_forward_fixes() -> Iterator[None]:
    """Work around two torch bugs that break backpropagating forward-mode tangents (the exact
    sharded Hessian): in-place ``exp`` outputs in the ``logsumexp`` rule (see
    :func:`exp_outputs_copied`) and non-differentiable normalisation rules
    (:class:`_CompositeNorms`)."""
    with exp_outputs_copied(), _CompositeNorms():
        yield


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
