"""What every product runs inside: swapped-in parameters, differentiable attention, warnings.

Parameters are never written: the module is re-parametrised with the operator's tensors for the
duration of one call (``torch.func.functional_call`` does the same), and when any submodule is in
training mode the buffers (BatchNorm statistics) are cloned so a product cannot update them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils._named_member_accessor import NamedMemberAccessor
from torch.nn.utils.stateless import _reparametrize_module


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``module`` with ``tensors`` in place of its parameters; restored even on exceptions.

    Buffers are cloned when any submodule is in training mode (not only the root: a BatchNorm
    left in train mode inside an eval-mode model updates its statistics too)."""
    replacement = dict(tensors)
    if any(submodule.training for submodule in module.modules()):
        for name, buffer in module.named_buffers():
            if buffer is not None and name not in replacement:
                replacement[name] = buffer.clone()
    with (
        _reparametrize_module(module, _untied_slots(module, replacement), strict=False),
        differentiable_hf_attention(module),
    ):
        yield


def _untied_slots(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` extended to every other name of the same tensor (tied weights such as a
    shared embedding and LM head), with one name per storage slot.

    A submodule registered under two names (``self.alias = self.body``; TransformerLens's bridge
    registers ``blocks`` and ``layers``) gives two names for one slot of one module. torch's own
    ``tie_weights=True`` swaps that slot twice and then restores it from the second swap, which
    returned the replacement: the model would keep a plain tensor in place of its
    ``nn.Parameter``. Swapping each (module, attribute) slot once restores the originals."""
    named: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, tensor in named.items():
        names_of.setdefault(id(tensor), []).append(name)
    accessor = NamedMemberAccessor(module)  # resolves paths as the swap will (getattr)
    untied: dict[str, torch.Tensor] = {}
    seen_slots: set[tuple[object, str]] = set()
    for given_name, value in tensors.items():
        original = named.get(given_name)
        tied = [] if original is None else [n for n in names_of[id(original)] if n != given_name]
        for name in (given_name, *tied):
            owner_name, _, attribute = name.rpartition(".")
            try:
                slot: tuple[object, str] = (id(accessor.get_submodule(owner_name)), attribute)
            except (AttributeError, TypeError):  # not a module path: the swap reports it
                slot = (owner_name, attribute)
            if slot in seen_slots:
                continue
            seen_slots.add(slot)
            untied[name] = value
    return untied


# HF attention implementations without forward-mode AD or double backward: FlashAttention,
# flex attention and hub kernels ("kernels-community/...").
_FUSED_HF_ATTENTION = ("flash", "flex", "/")


@contextlib.contextmanager
def differentiable_hf_attention(module: nn.Module) -> Iterator[None]:
    """Switch HuggingFace models inside ``module`` whose attention kernel cannot be
    differentiated twice or in forward mode (FlashAttention, flex attention, hub kernels) to
    SDPA (eager where the model has no SDPA) for the duration; the user's setting is restored.
    SDPA itself then runs on the math backend under :func:`differentiable_attention`."""
    switched: dict[int, tuple[object, str]] = {}
    if "transformers" not in sys.modules:  # no HuggingFace config can exist: skip the walk
        yield
        return
    for submodule in module.modules():
        config = getattr(submodule, "config", None)
        implementation = getattr(config, "_attn_implementation_internal", None)
        if id(config) in switched or not isinstance(implementation, str):
            continue
        if any(marker in implementation for marker in _FUSED_HF_ATTENTION):
            switched[id(config)] = (config, implementation)
            target = "sdpa" if getattr(submodule, "_supports_sdpa", True) else "eager"
            config._attn_implementation_internal = target  # type: ignore[union-attr]
    try:
        yield
    finally:
        for config, implementation in switched.values():
            config._attn_implementation_internal = implementation  # type: ignore[attr-defined]


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math backend, which supports double
    backward and forward-mode AD (the fused kernels do not), and switch off the native fast path
    of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` (taken in eval mode when no input
    requires grad, as inside ``torch.func.jvp``; it has no forward-mode AD). The user's settings
    are restored."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # very old torch: nothing to select
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        stack.enter_context(_mha_fastpath_disabled())
        yield


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


_TF32_WARNED = False


def warn_if_tf32(device: torch.device) -> None:
    """Warn once when TF32 matmuls are on: they cost about three orders of magnitude of accuracy."""
    global _TF32_WARNED
    if _TF32_WARNED or device.type != "cuda":
        return
    if torch.backends.cuda.matmul.allow_tf32:
        _TF32_WARNED = True
        warnings.warn(
            "TF32 matmuls are enabled (torch.backends.cuda.matmul.allow_tf32): "
            "curvature products lose about three orders of magnitude of accuracy. Disable TF32 "
            "for exact products: torch.backends.cuda.matmul.allow_tf32 = False",
            stacklevel=3,
        )
