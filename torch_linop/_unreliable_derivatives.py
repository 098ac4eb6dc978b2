"""Layers whose second derivatives PyTorch gets wrong, found where an operator is built.

``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the older hook
``torch.nn.utils.weight_norm``) has an asymmetric double backward: a reverse-over-reverse
Hessian through it is neither symmetric nor right (26% off on a small model, issue 19), and it
has no forward-mode AD. First-derivative products (the GGN, the empirical and MC Fisher) and
finite differences of gradients are right.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

from torch_linop._warnings import user_stacklevel
from torch_linop.params import tied_padding_rows


def weight_normed_parameters(model: nn.Module, selected: Iterable[str]) -> list[str]:
    """The names in ``selected`` that feed a weight norm (its direction and its magnitude)."""
    prefixes: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                if any(isinstance(step, _WeightNorm) for step in chain):
                    prefixes.append(f"{prefix}parametrizations.{tensor_name}.")
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                prefixes += [f"{prefix}{hook.name}_g", f"{prefix}{hook.name}_v"]
    return [name for name in selected if any(name.startswith(p) for p in prefixes)]


def warn_if_second_derivatives_unreliable(
    model: nn.Module, selected: Iterable[str], operator_name: str, method: str | None
) -> None:
    """Warn when a Hessian by ``method="autograd"`` or ``"forward"`` would differentiate twice
    through a weight norm, naming the methods that are right."""
    if method not in ("autograd", "forward"):
        return
    affected = weight_normed_parameters(model, selected)
    if not affected:
        return
    warnings.warn(
        f"{operator_name}(method={method!r}) differentiates twice through a weight norm "
        f"(parameters {affected[:4]}{' ...' if len(affected) > 4 else ''}): PyTorch's double "
        "backward of torch._weight_norm is not symmetric, so this Hessian is wrong, and it has "
        "no forward-mode AD. Use method='finite_difference' for the Hessian (or the GGN / "
        "empirical Fisher, which are right), or torch.nn.utils.parametrize.remove_"
        "parametrizations(module, 'weight') to train the plain weight; operator."
        "check_symmetric() tests any operator",
        stacklevel=user_stacklevel(),
    )


def warn_if_tied_padding_rows(
    model: nn.Module,
    selected: dict[str, Any],
    operator_name: str,
    method: str | None,
    jvp_method: str | None,
) -> None:
    """Warn when an embedding's padding row is tied to another module (an LM head) and the
    product uses forward mode or finite differences: reverse mode ignores the embedding's use of
    that row, they do not, and the matrix comes out different and not symmetric (55% apart on a
    small tied model). Reverse-mode-only products agree with each other and are symmetric."""
    if method == "autograd" or jvp_method == "double_backward":
        return
    tied = tied_padding_rows(model, selected)
    if not tied:
        return
    warnings.warn(
        f"{operator_name}: the padding row of the embedding weight {tied[0]!r} is shared with "
        "another module (a tied LM head); reverse mode ignores the embedding's use of that row "
        "but forward mode and finite differences do not, so this operator's matrix is not "
        "symmetric and differs from the autograd one. Use HessianOperator(method='autograd') or "
        "GGNOperator/EmpiricalFisherOperator(jvp_method='double_backward'), or leave the "
        "embedding out of param_filter",
        stacklevel=user_stacklevel(),
    )
