"""Whether a faster autodiff path works for a model, found out once and then fixed.

Batched columns (``torch.func.vmap`` over forward-mode JVPs, ``is_grads_batched`` backwards) and
forward-mode AD itself are missing for some operations (custom autograd functions, some fused
kernels). What an error message says about it differs between PyTorch versions and operations,
so the probe does not read it: the first product that can use the fast path tries it; when it
raises, the exact fallback runs, and only when the fallback succeeds is the fast path recorded as
unsupported (an error of the user's model raises in the fallback too, and decides nothing). Every
later product takes the recorded path with no ``try``. The price of not reading the error: a
one-off failure during the probing product that the fallback does not repeat also records the
fast path as unsupported, which costs speed, never correctness (both paths are exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from torch_linop._autodiff import _is_oom

Result = TypeVar("Result")


class Capability:
    """One probed capability: ``supported`` is ``None`` until the first product that needed it,
    then ``True`` or ``False`` for good; ``probes`` counts the products that tried it undecided
    (1 once decided, more only while every try also failed in the fallback)."""

    def __init__(self, name: str, supported: bool | None = None) -> None:
        self.name = name
        self.supported = supported
        self.probes = 0
        self.reason: str | None = None  # why the fast path was given up (its error, one line)

    def choose(self, fast: Callable[[], Result], fallback: Callable[[], Result]) -> Result:
        """``fast()`` where supported, ``fallback()`` where not; undecided: try ``fast()``, and
        on any error but out-of-memory decide by whether ``fallback()`` then succeeds."""
        if self.supported is True:
            return fast()
        if self.supported is False:
            return fallback()
        self.probes += 1
        try:
            result = fast()
        except Exception as error:  # not matched by text: the fallback decides (docstring)
            if _is_oom(error):
                raise
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            self.supported = True
            return result
        # outside the handler: the failed path's frames (and tensors) are released first
        result = fallback()
        self.supported, self.reason = False, reason
        return result

    def __repr__(self) -> str:
        state = {None: "not probed yet", True: "supported", False: "unsupported"}[self.supported]
        return f"Capability({self.name!r}: {state})"


@dataclass
class Capabilities:
    """What the products of one operator found out about its model, each probed once: whether
    it has forward-mode AD, whether ``vmap`` runs its forward-mode JVPs (or, for the Hessian's
    ``method="forward"``, its forward-over-reverse products) over a block's columns, and whether
    a backward takes a block's columns at once (``is_grads_batched``)."""

    forward_ad: Capability = field(default_factory=lambda: Capability("forward-mode AD"))
    vmap_jvp: Capability = field(default_factory=lambda: Capability("vmap over forward-mode JVPs"))
    batched_backward: Capability = field(
        default_factory=lambda: Capability("batched backward (is_grads_batched)")
    )

    def as_dict(self) -> dict[str, bool | None]:
        """``{name: supported}``, ``None`` where no product needed it yet."""
        return {name: getattr(self, name).supported for name in self.__dataclass_fields__}
