"""What every product runs inside: swapped-in parameters, differentiable attention, warnings.

Parameters are never written: the module is re-parametrised with the operator's tensors for the
duration of one call (``torch.func.functional_call`` does the same), and training-mode buffers
(BatchNorm statistics) are cloned so a product cannot update them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``module`` with ``tensors`` in place of its parameters; restored even on exceptions."""
    replacement = dict(tensors)
    if module.training:
        for name, buffer in module.named_buffers():
            if buffer is not None and name not in replacement:
                replacement[name] = buffer.clone()
    with _reparametrize_module(module, replacement, tie_weights=True, strict=False):
        yield


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math backend, which supports double
    backward and forward-mode AD (the fused kernels do not); the user's setting is restored."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch: nothing to select
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


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
