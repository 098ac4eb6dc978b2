"""The backends of ``ce_hvp`` and the one place that chooses among them.

``BACKENDS`` lists them best first: the Hopper cluster kernel, the Triton two-pass kernel,
``torch.compile`` of the reference, the eager reference. Each says whether it applies to a call
(``applies`` returns a :class:`Verdict` with the reason when it does not) and runs it. A call
with ``backend=B`` considers the backends of family ``B`` (``"triton"``: cluster, then two-pass);
``"auto"`` considers all. :func:`dispatch` runs the first that applies; when one raises and
another applies after it, it warns once, remembers the failure (the failed backend is not tried
again in this process while another applies) and hands the call on.

Switches: ``TORCH_LINOP_CE_HVP_CLUSTER=0`` keeps every call off the cluster kernel (for
comparisons); ``TORCH_LINOP_CE_HVP_AUTOTUNE=0`` (read by the Triton and cluster launchers) uses
their default configs instead of timing candidates on the first call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._ce_hvp_reference import ce_hvp_compiled, ce_hvp_eager, row_mask

__all__ = [
    "BACKENDS",
    "CLUSTER_ENV",
    "Backend",
    "CeHvpCall",
    "Verdict",
    "dispatch",
    "explain",
    "failed_backends",
    "select",
]

CLUSTER_ENV = "TORCH_LINOP_CE_HVP_CLUSTER"
# Backends that raised in this process, with the error (skipped while another applies).
failed_backends: dict[str, str] = {}


@dataclass(frozen=True)
class CeHvpCall:
    """One checked call, in the backends' layout: logits, u and out (B, T, V), labels (B, T).

    ``out`` is where the result must go (``u`` itself in place, a user's buffer) or None for a
    new tensor; ``scale`` is 1 / (rows with a target) for ``"mean"``, 1 for ``"sum"``;
    ``requested`` is the ``backend=`` argument.
    """

    logits: torch.Tensor
    u: torch.Tensor
    labels: torch.Tensor | None
    out: torch.Tensor | None
    ignore_index: int
    shift: bool
    scale: torch.Tensor | float
    result_dtype: torch.dtype
    requested: str

    @property
    def on_cuda(self) -> bool:
        return self.logits.device.type == "cuda"

    @property
    def needs_autograd(self) -> bool:
        """Whether the result must carry an autograd graph (only the references keep one)."""
        return torch.is_grad_enabled() and (self.logits.requires_grad or self.u.requires_grad)

    def output(self) -> torch.Tensor:
        """``out``, or a new (B, T, V) tensor of the result dtype for kernels that write."""
        if self.out is not None:
            return self.out
        return torch.empty(self.logits.shape, dtype=self.result_dtype, device=self.logits.device)

    def launch(self, kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Run a writing kernel (cluster, two-pass: one launcher signature) on this call."""
        return kernel(
            self.logits,
            self.u,
            self.labels,
            self.output(),
            ignore_index=self.ignore_index,
            shift=self.shift,
            scale=self.scale,
        )


@dataclass(frozen=True)
class Verdict:
    """Whether a backend applies to a call; ``reason`` says why not (empty when it applies)."""

    applies: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.applies


APPLIES = Verdict(True)


def _auto_prefers_eager(call: CeHvpCall) -> Verdict:
    """Under ``backend="auto"``, CPU calls and calls autograd must flow through stay eager."""
    if call.requested != "auto":
        return APPLIES
    if not call.on_cuda:
        return Verdict(
            False,
            f"'auto' keeps {call.logits.device.type} calls eager (torch.compile costs seconds of "
            "warm-up per shape there, Triton runs only through its slow interpreter)",
        )
    if call.needs_autograd:
        return Verdict(False, "autograd must flow through the result: only eager keeps a graph")
    return APPLIES


class Backend:
    """A way to compute ``ce_hvp``: ``name``, the ``backend=`` ``family`` it answers to, what
    it is (for messages), whether it ``applies`` to a call, and ``run``, which returns the
    result (B, T, V), written into ``call.out`` when that is given."""

    name: str = ""
    family: str = ""
    description: str = ""

    def applies(self, call: CeHvpCall) -> Verdict:
        raise NotImplementedError

    def run(self, call: CeHvpCall) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<ce_hvp backend {self.name!r}>"


class ClusterBackend(Backend):
    """The Hopper cluster kernel (``_ce_hvp_cluster``): one read of each row, CUDA C++ via NVRTC."""

    name, family, description = "cluster", "triton", "Hopper cluster kernel"

    def applies(self, call: CeHvpCall) -> Verdict:
        verdict = _auto_prefers_eager(call)
        if not verdict:
            return verdict
        if os.environ.get(CLUSTER_ENV, "1") == "0":
            return Verdict(False, f"switched off by {CLUSTER_ENV}=0")
        if not -(2**31) <= call.ignore_index < 2**31:
            return Verdict(False, f"takes a 32-bit ignore_index (got {call.ignore_index})")
        if not call.on_cuda:
            return Verdict(False, f"needs CUDA tensors (got {call.logits.device})")
        from . import _ce_hvp_cluster

        reason = _ce_hvp_cluster.why_not(call.logits, call.u, call.out)
        return APPLIES if reason is None else Verdict(False, reason)

    def run(self, call: CeHvpCall) -> torch.Tensor:
        from ._ce_hvp_cluster import ce_hvp_cluster

        return call.launch(ce_hvp_cluster)


class TwoPassBackend(Backend):
    """The Triton two-pass kernel (``_ce_hvp_two_pass``): every float dtype, any strides; on a
    CPU only through Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""

    name, family, description = "two_pass", "triton", "Triton two-pass kernel"

    def applies(self, call: CeHvpCall) -> Verdict:
        verdict = _auto_prefers_eager(call)
        if not verdict:
            return verdict
        if call.on_cuda:
            return APPLIES  # Triton itself is imported by run: a failure there falls back
        try:
            from ._ce_hvp_common import is_interpreter
        except ImportError as error:
            return Verdict(False, f"Triton is not importable ({error})")
        if is_interpreter():
            return APPLIES
        return Verdict(
            False,
            f"needs CUDA tensors (got {call.logits.device}); use backend='eager', or set "
            "TRITON_INTERPRET=1 before importing triton",
        )

    def run(self, call: CeHvpCall) -> torch.Tensor:
        from ._ce_hvp_two_pass import ce_hvp_two_pass

        return call.launch(ce_hvp_two_pass)


class _ReferenceBackend(Backend):
    """Shared by eager and compile: the plain PyTorch formula, then a copy into ``out``."""

    def _reference(self) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def run(self, call: CeHvpCall) -> torch.Tensor:
        mask = row_mask(
            call.labels,
            call.logits.shape[:-1],
            ignore_index=call.ignore_index,
            shift=call.shift,
            device=call.logits.device,
        )
        result = self._reference()(call.logits, call.u, mask, call.scale, call.result_dtype)
        return result if call.out is None else call.out.copy_(result)


class CompileBackend(_ReferenceBackend):
    """``torch.compile`` of the eager reference (compiled once per process, per shape)."""

    name, family, description = "compile", "compile", "torch.compile backend"

    def applies(self, call: CeHvpCall) -> Verdict:
        return _auto_prefers_eager(call)

    def _reference(self) -> Callable[..., torch.Tensor]:
        return ce_hvp_compiled


class EagerBackend(_ReferenceBackend):
    """The eager reference: any device and dtype, differentiable; what the tests compare with."""

    name, family, description = "eager", "eager", "eager reference"

    def applies(self, call: CeHvpCall) -> Verdict:
        return APPLIES

    def _reference(self) -> Callable[..., torch.Tensor]:
        return ce_hvp_eager


# The registry, best first.
BACKENDS: tuple[Backend, ...] = (
    ClusterBackend(),
    TwoPassBackend(),
    CompileBackend(),
    EagerBackend(),
)
FAMILIES = ("auto", *dict.fromkeys(backend.family for backend in BACKENDS))


def explain(call: CeHvpCall) -> list[tuple[Backend, Verdict]]:
    """Every backend the call's ``backend=`` argument allows, in order, with its verdict."""
    return [
        (backend, backend.applies(call))
        for backend in BACKENDS
        if call.requested in ("auto", backend.family)
    ]


def select(call: CeHvpCall) -> list[Backend]:
    """The backends ``dispatch`` would try, in order: those that apply, less those that failed
    earlier in this process (the last that applies is kept, so a request is never left empty).
    Raises ValueError, with every reason, when none applies."""
    verdicts = explain(call)
    applicable = [backend for backend, verdict in verdicts if verdict]
    if not applicable:
        reasons = "; ".join(f"{backend.name}: {verdict.reason}" for backend, verdict in verdicts)
        raise ValueError(f"ce_hvp: backend={call.requested!r} cannot take this call ({reasons})")
    return [b for b in applicable[:-1] if b.name not in failed_backends] + applicable[-1:]


def dispatch(call: CeHvpCall) -> torch.Tensor:
    """Run the call on the first backend of :func:`select`; on an error, when another backend
    follows, warn (once: the failure is remembered) and run that one instead."""
    chosen = select(call)
    for position, backend in enumerate(chosen):
        try:
            return backend.run(call)
        except Exception as error:
            if position == len(chosen) - 1:
                raise
            failed_backends[backend.name] = f"{type(error).__name__}: {error}"[:300]
            warnings.warn(
                f"ce_hvp: the {backend.description} failed ({failed_backends[backend.name]}); "
                f"falling back to {chosen[position + 1].name!r} for the rest of this process",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable: the last backend either returns or raises")
