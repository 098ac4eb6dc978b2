"""How a product takes ``J V``, the Jacobian of the model output (or per-sample losses) times
k tangents: one strategy per ``jvp_method``, chosen once when the operator is built.

Each strategy is called as ``jvp(model, forward, leaves, tangents, output)`` and returns
``(J V, output)``: the k JVPs ``(k, *output.shape)`` and the output with its autograd graph
(for the VJP that follows). A given ``output`` is a kept forward pass (``cache_graph=True``):
the strategy then records no graph of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from torch_linop import _autodiff
from torch_linop._autodiff import _is_oom, double_backward_jvps, jvp_without_graph, stack_columns
from torch_linop._context import reparametrized
from torch_linop._finite_difference import local_step, norm_of, shifted
from torch_linop.products.capability import Capabilities, Capability

Forward = Callable[[], torch.Tensor]

JVP_METHODS = ("auto", "forward", "double_backward", "finite_difference", "forward_difference")


class JVP(Protocol):
    """``(J V, output)`` for one batch (module docstring)."""

    capturable: bool  # whether a CUDA graph can replay it (no host-side step per vector)

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _record_output(
    model: nn.Module, forward: Forward, leaves: dict[str, torch.Tensor]
) -> torch.Tensor:
    with reparametrized(model, leaves):
        return forward()


class ForwardModeJVP:
    """Forward-mode AD: the k columns in one vmapped pass where vmap works (probed once), else
    one dual forward each. Without a kept output, the first looped column's dual forward also
    records the output's graph (one forward fewer); when that runs out of memory, the JVPs are
    taken without a graph and the output by one plain forward from then on (the one
    out-of-memory fallback: a recorded dual forward holds the tangent computations too)."""

    capturable = True

    def __init__(self, vmap_jvp: Capability) -> None:
        self.vmap_jvp = vmap_jvp
        self.record_output_in_dual_forward = True

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tangents[0].shape[0] > 1:
            jvps, output = self.vmap_jvp.choose(
                lambda: (vmapped_jvps(model, forward, leaves, tangents), output),
                lambda: self._looped(model, forward, leaves, tangents, output),
            )
        else:
            jvps, output = self._looped(model, forward, leaves, tangents, output)
        if output is None:
            output = _record_output(model, forward, leaves)
        return jvps, output

    def _looped(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        names = list(leaves)
        columns = []
        for j in range(tangents[0].shape[0]):
            tangent = {name: t[j] for name, t in zip(names, tangents)}
            if output is None and self.record_output_in_dual_forward:
                recorded = self._recorded(model, forward, leaves, tangent)
                if recorded is not None:
                    output, jvp = recorded
                    columns.append(jvp)
                    continue
            columns.append(jvp_without_graph(forward, model, leaves, tangent))
        return stack_columns(columns), output

    def _recorded(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangent: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(output, J v)`` from one recording dual forward; ``None`` when it ran out of memory
        (then this strategy records no more: see the class docstring)."""
        try:
            return _autodiff.forward_with_tangent(forward, model, leaves, tangent)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
        self.record_output_in_dual_forward = False
        device = next(iter(leaves.values())).device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(
            "out of memory in the dual-number forward pass that also records the backward "
            "graph (it holds the tangent computations too); the products now use a JVP that "
            "records no graph plus one plain forward pass (about 15% slower, a third of the "
            "memory). cache_graph=True is faster and lighter still.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def vmapped_jvps(
    model: nn.Module,
    forward: Forward,
    leaves: dict[str, torch.Tensor],
    tangents: list[torch.Tensor],
) -> torch.Tensor:
    """The k JVPs ``(k, *output.shape)`` in one vmapped forward-mode pass (on detached
    primals: no graph is recorded)."""
    primals = {name: leaf.detach() for name, leaf in leaves.items()}
    tangent_dict = dict(zip(leaves, tangents))

    def output_of(values: dict[str, torch.Tensor]) -> torch.Tensor:
        with reparametrized(model, values):
            return forward()

    def jvp_of(tangent: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.jvp(output_of, (primals,), (tangent,))[1]

    return torch.func.vmap(jvp_of, randomness="same")(tangent_dict)


class DoubleBackwardJVP:
    """Exact JVPs without forward-mode AD: differentiate ``u -> J^T u`` in ``u`` (one
    ``create_graph`` backward shared by all columns, then one batched backward where batching
    works, probed once, else one per column)."""

    capturable = True

    def __init__(self, batched_backward: Capability) -> None:
        self.batched_backward = batched_backward

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if output is None:
            output = _record_output(model, forward, leaves)
        leaf_list = list(leaves.values())
        if tangents[0].shape[0] > 1:
            jvps = self.batched_backward.choose(
                lambda: double_backward_jvps(output, leaf_list, tangents, batched=True),
                lambda: double_backward_jvps(output, leaf_list, tangents, batched=False),
            )
        else:
            jvps = double_backward_jvps(output, leaf_list, tangents, batched=False)
        return jvps, output


class ForwardOrDoubleBackwardJVP:
    """``jvp_method="auto"``: forward mode where the model supports it (probed once), else the
    exact double-backward JVP."""

    capturable = True

    def __init__(
        self,
        forward_mode: ForwardModeJVP,
        double_backward: DoubleBackwardJVP,
        forward_ad: Capability,
    ) -> None:
        self.forward_mode = forward_mode
        self.double_backward = double_backward
        self.forward_ad = forward_ad

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_ad.choose(
            lambda: self.forward_mode(model, forward, leaves, tangents, output),
            lambda: self.double_backward(model, forward, leaves, tangents, output),
        )


class FiniteDifferenceJVP:
    """Approximate JVPs by finite differences of forward passes (no graph): central
    (two shifted forwards, relative error ~1e-5 in float32) or one-sided against the unshifted
    output (one shifted forward, about 20% cheaper, ~1e-3 in float32, unusable in bf16). The step
    is sized for the parameters' dtype (torch_linop/_finite_difference.py); it is computed on
    the host for every vector, so a CUDA graph cannot replay it."""

    capturable = False

    def __init__(self, central: bool) -> None:
        self.central = central

    def __call__(
        self,
        model: nn.Module,
        forward: Forward,
        leaves: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        output: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if output is None:
            output = _record_output(model, forward, leaves)
        theta = {name: leaf.detach() for name, leaf in leaves.items()}
        return finite_difference_jvps(
            model, forward, theta, tangents, output, central=self.central
        ), output


def finite_difference_jvps(
    model: nn.Module,
    forward: Forward,
    theta: dict[str, torch.Tensor],
    tangents: list[torch.Tensor],
    output: torch.Tensor,
    *,
    central: bool,
) -> torch.Tensor:
    """The k JVPs ``(k, *output.shape)`` by differences of forwards at ``theta +- h v``."""
    param_dtype = next(iter(theta.values())).dtype
    acc = torch.float64 if param_dtype == torch.float64 else torch.float32
    eps = torch.finfo(param_dtype).eps
    acc_theta = [t.to(acc) for t in theta.values()]
    dtypes = [t.dtype for t in theta.values()]
    theta_norm = norm_of(acc_theta)
    power = 1.0 / 3.0 if central else 1.0 / 2.0  # balances truncation and rounding
    jvps = []
    with torch.no_grad():
        for j in range(tangents[0].shape[0]):
            direction = [t[j].to(acc) for t in tangents]
            v_norm = norm_of(direction)
            if v_norm == 0.0:
                jvps.append(torch.zeros_like(output))
                continue
            step = local_step(acc_theta, direction, theta_norm, v_norm, eps, power)
            outs = []
            for sign in (1.0, -1.0) if central else (1.0,):
                moved = shifted(acc_theta, direction, sign * step, dtypes)
                with reparametrized(model, dict(zip(theta, moved))):
                    outs.append(forward().to(acc))
            if central:
                difference = (outs[0] - outs[1]).div_(2 * step)
            else:
                difference = outs[0].sub_(output.detach().to(acc)).div_(step)
            jvps.append(difference.to(output.dtype))
            del outs, difference
    return stack_columns(jvps)


def make_jvp(
    jvp_method: str,
    capabilities: Capabilities,
    *,
    owner: str,
    valid: tuple[str, ...] = JVP_METHODS,
    cuda_graph: bool = False,
) -> JVP:
    """The strategy for ``jvp_method`` (one of ``valid``), sharing ``capabilities``; refused
    with the valid names, or when ``cuda_graph`` asks to replay a strategy that cannot be."""
    if jvp_method not in valid:
        raise ValueError(f"{owner}: jvp_method must be one of {valid}, got {jvp_method!r}")
    jvp: JVP
    if jvp_method in ("finite_difference", "forward_difference"):
        jvp = FiniteDifferenceJVP(central=jvp_method == "finite_difference")
    elif jvp_method == "double_backward":
        jvp = DoubleBackwardJVP(capabilities.batched_backward)
    elif jvp_method == "forward":
        jvp = ForwardModeJVP(capabilities.vmap_jvp)
    else:
        jvp = ForwardOrDoubleBackwardJVP(
            ForwardModeJVP(capabilities.vmap_jvp),
            DoubleBackwardJVP(capabilities.batched_backward),
            capabilities.forward_ad,
        )
    if cuda_graph is True and not jvp.capturable:
        raise ValueError(
            f"cuda_graph=True cannot capture jvp_method={jvp_method!r}: its step is computed "
            "on the host for every vector; use the exact JVP (jvp_method='auto') with it"
        )
    return jvp
