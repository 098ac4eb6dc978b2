"""Probes of the environment that change how a table must be read."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def torch_func_layer_norm_bug() -> bool:
    """True if ``torch.func`` second derivatives through ``layer_norm`` with a weight are wrong.

    Seen on torch 2.13 (CPU): differentiating ``vmap(vjp(f))`` (so ``jacrev`` and
    ``torch.func.hessian``) gives a wrong weight-input block, while ``torch.autograd`` double
    backward, ``jacfwd(grad(f))`` and central differences agree. Libraries that build the
    Hessian from ``jacrev`` (curvlinops' ``HessianLinearOperator``) inherit the error.
    """
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(18, dtype=torch.float64, generator=generator)

    def f(values: torch.Tensor) -> torch.Tensor:
        x, weight = values[:15].reshape(5, 3), values[15:]
        return (F.layer_norm(x, (3,), weight=weight) ** 3).sum()

    exact = torch.autograd.functional.hessian(f, z)
    via_func = torch.func.hessian(f)(z)
    return not torch.allclose(via_func, exact, rtol=1e-8, atol=1e-8)


TORCH_FUNC_BUG_NOTE = (
    "this torch's `torch.func` second derivatives through `layer_norm` with a weight are wrong "
    "(`torch.func.hessian` and `jacrev(jacrev(f))` disagree with double backward and central "
    "differences on the weight-input block; `jacfwd(grad(f))` is right): curvlinops' "
    "Hessian, which differentiates `jacrev`, inherits the error on models with LayerNorm"
)
