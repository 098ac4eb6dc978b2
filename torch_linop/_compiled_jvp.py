"""Jacobian-vector products through ``torch.compile``.

A dual-number forward pass runs every tangent computation (layer norms, activations, softmax,
residual adds) as its own memory-bound kernel next to the primal one; inductor fuses them. The
products are the same (forward-mode AD, exact); the first one compiles (seconds on a small model,
about a minute on GPT-2 small), a new input shape compiles again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from torch_linop._context import reparametrized


def functional_jvp(
    model: torch.nn.Module,
    forward: Callable[[], torch.Tensor],
    primals: dict[str, torch.Tensor],
    tangent: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``J v`` of ``forward()`` with the model's parameters at ``primals``, by ``torch.func.jvp``
    (no autograd graph: the primals are detached)."""

    def output_of(values: dict[str, torch.Tensor]) -> torch.Tensor:
        with reparametrized(model, values):
            return forward()

    return torch.func.jvp(output_of, (primals,), (tangent,))[1]


class CompiledJVP:
    """:func:`functional_jvp` under ``torch.compile``. When compilation fails it warns once and
    answers ``None`` from then on, so that the caller runs its eager forward-mode path."""

    def __init__(self) -> None:
        self._compiled: Any = None
        self.failed = False

    def __call__(
        self,
        model: torch.nn.Module,
        forward: Callable[[], torch.Tensor],
        primals: dict[str, torch.Tensor],
        tangent: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        if self.failed:
            return None
        if self._compiled is None:
            self._compiled = torch.compile(functional_jvp)
        try:
            return self._compiled(model, forward, primals, tangent)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compiler failure: the eager path decides what is wrong
            self.failed = True
            warnings.warn(
                f"compile_jvp=True: torch.compile failed ({type(error).__name__}: "
                f"{str(error)[:300]}); the products use eager forward-mode AD instead (the same "
                "numbers, slower). Pass compile_jvp=False to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
