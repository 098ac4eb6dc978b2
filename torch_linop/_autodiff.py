"""Autodiff building blocks shared by the per-batch products.

``sandwich_product`` computes ``J^T M J V`` for the Jacobian J of some function of the parameters
(the model output for the GGN and MC Fisher, the per-sample losses for the empirical Fisher) and a
"middle" map M, with an exact forward-mode JVP and one VJP: no double backward through the loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from torch_linop._context import reparametrized

Middle = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (output, vectors (k,...)) -> (k,...)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def is_vmap_failure(error: BaseException) -> bool:
    """Whether an error says that an op cannot run batched (vmap / is_grads_batched), as
    opposed to an error of the user's model, which must propagate."""
    message = str(error).lower()
    return any(key in message for key in ("vmap", "batching rule", "batched", "functorch"))


def make_leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached views of the parameters that require grad: autograd leaves, no copy."""
    return {name: param.detach().requires_grad_(True) for name, param in params.items()}


def grads_or_zeros(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Replace ``None`` (a parameter the output does not depend on) by zeros."""
    return [torch.zeros_like(ref) if g is None else g for g, ref in zip(grads, like)]


def vjp_columns(
    output: torch.Tensor,
    leaves: list[torch.Tensor],
    cotangents: torch.Tensor,
    *,
    batched: bool,
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """``J^T u`` for each of the k cotangents ``(k, *output.shape)``; returns ``(k, *p.shape)``.
    ``retain_graph`` keeps the output's graph for later products (the cached-graph mode)."""
    num_columns = cotangents.shape[0]
    if num_columns > 1 and batched:
        grads = torch.autograd.grad(
            output,
            leaves,
            grad_outputs=cotangents,
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return [
            torch.zeros((num_columns, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
            if g is None
            else g
            for g, leaf in zip(grads, leaves)
        ]
    columns = []
    for j in range(num_columns):
        grads = torch.autograd.grad(
            output,
            leaves,
            grad_outputs=cotangents[j],
            retain_graph=retain_graph or j < num_columns - 1,
            allow_unused=True,
        )
        columns.append(grads_or_zeros(grads, leaves))
    return [torch.stack(per_param) for per_param in zip(*columns)]


def stack_columns(columns: list[torch.Tensor]) -> torch.Tensor:
    """``(k, *shape)`` from k tensors; one column is a view, not a copy (a language model's JVP
    is logits-sized)."""
    return columns[0].unsqueeze(0) if len(columns) == 1 else torch.stack(columns)


def forward_with_tangent(
    forward: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    tangent: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass with dual numbers: the output (with its autograd graph) and ``J v``."""
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
        with reparametrized(model, duals):
            dual_output = forward()
        primal, jvp = fwAD.unpack_dual(dual_output)
        if jvp is None:
            jvp = torch.zeros_like(primal)
        # the primal view must outlive the dual level: keep a differentiable alias of it
        return primal.view_as(primal), jvp.detach()


def jvp_without_graph(
    forward: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    tangent: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``J v`` by one dual forward that records no autograd graph. With the leaves requiring
    grad, a recorded dual forward also records the tangent computations (forward-mode formulas
    are differentiable), which holds their inputs until the level ends: about three times a
    gradient's memory on a transformer. Without a graph only the JVP remains."""
    with torch.no_grad(), fwAD.dual_level():
        duals = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
        with reparametrized(model, duals):
            dual_output = forward()
        primal, jvp = fwAD.unpack_dual(dual_output)
        return torch.zeros_like(primal) if jvp is None else jvp


def double_backward_jvp(
    output: torch.Tensor, leaves: list[torch.Tensor], tangent: list[torch.Tensor]
) -> torch.Tensor:
    """``J v`` without forward-mode AD: differentiate the linear map ``u -> J^T u`` in ``u``."""
    dummy = torch.zeros_like(output, requires_grad=True)
    grads = torch.autograd.grad(
        output, leaves, grad_outputs=dummy, create_graph=True, allow_unused=True
    )
    pairs = [(g, t) for g, t in zip(grads, tangent) if g is not None and g.requires_grad]
    if not pairs:
        return torch.zeros_like(output)
    (jvp,) = torch.autograd.grad(
        [g for g, _ in pairs],
        dummy,
        grad_outputs=[t for _, t in pairs],
        retain_graph=True,
        allow_unused=True,
    )
    return torch.zeros_like(output) if jvp is None else jvp


def double_backward_jvps(
    output: torch.Tensor, leaves: list[torch.Tensor], tangents: list[torch.Tensor], *, batched: bool
) -> torch.Tensor:
    """The k JVPs ``(k, *output.shape)`` of ``tangents`` (each ``(k, *leaf.shape)``) by double
    backward: one ``create_graph`` backward shared by all columns, then the k derivatives of
    ``<J^T u, v_j>`` in ``u`` (vmapped over columns when ``batched``)."""
    num_columns = tangents[0].shape[0]
    dummy = torch.zeros_like(output, requires_grad=True)
    grads = torch.autograd.grad(
        output, leaves, grad_outputs=dummy, create_graph=True, allow_unused=True
    )
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    zeros = torch.zeros((num_columns, *output.shape), dtype=output.dtype, device=output.device)
    if not live:
        return zeros
    outputs = [grads[i] for i in live]
    if batched and num_columns > 1:
        (jvps,) = torch.autograd.grad(
            outputs,
            dummy,
            grad_outputs=[tangents[i] for i in live],
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        return zeros if jvps is None else jvps
    for j in range(num_columns):
        (jvp,) = torch.autograd.grad(
            outputs,
            dummy,
            grad_outputs=[tangents[i][j] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        if jvp is not None:
            zeros[j] = jvp
    return zeros


def _lacks_forward_ad(error: BaseException) -> bool:
    message = str(error).lower()
    return any(key in message for key in ("forward ad", "forward-mode", "forward_ad", "jvp"))


class SandwichProduct:
    """Computes ``J^T M J V`` for one batch; remembers which autodiff paths the model supports.

    ``jvp_method="auto"`` uses forward-mode AD and falls back, exactly, to a double-backward JVP
    for models without forward-mode support (the choice is remembered).
    """

    def __init__(self, jvp_method: str = "auto") -> None:
        if jvp_method not in ("auto", "forward", "double_backward"):
            raise ValueError(
                f"jvp_method must be 'auto', 'forward' or 'double_backward', got {jvp_method!r}"
            )
        self.jvp_method = jvp_method
        self._forward_ok = jvp_method in ("auto", "forward")
        # whether the first dual forward also records the output's graph for the VJP (one
        # forward fewer, but the tangent computations are recorded too); False: graph-free
        # JVPs and one plain forward (benchmarks/lm_ggn.py compares the two)
        self.record_output_in_dual_forward = True
        # vmap over forward-mode JVPs and batched VJPs can fail independently: two flags
        self._batched_jvp_ok = True
        self._batched_vjp_ok = True

    def __call__(
        self,
        model: torch.nn.Module,
        forward: Callable[[], torch.Tensor],
        params: dict[str, torch.Tensor],
        tangents: list[torch.Tensor],
        middle: Middle,
    ) -> list[torch.Tensor]:
        leaves = make_leaves(params)
        jvps, output = self._jvps(model, forward, leaves, tangents, None)
        cotangents = middle(output.detach(), jvps)
        del jvps  # output-sized (the logits of a language model): not alive during the backward
        return self._vjp(output, list(leaves.values()), cotangents)

    def on_kept_graph(
        self,
        model: torch.nn.Module,
        forward: Callable[[], torch.Tensor],
        leaves: dict[str, torch.Tensor],
        output: torch.Tensor,
        tangents: list[torch.Tensor],
        middle: Middle,
    ) -> list[torch.Tensor]:
        """``J^T M J V`` with a kept ``output`` (a function of ``leaves`` with its graph): JVPs
        that record no graph, then one VJP that keeps the output's graph for the next product."""
        jvps, _ = self._jvps(model, forward, leaves, tangents, output)
        cotangents = middle(output.detach(), jvps)
        del jvps  # output-sized: not alive during the backward
        return self._vjp(output, list(leaves.values()), cotangents, retain_graph=True)

    def _jvps(self, model, forward, leaves, tangents, output):
        """``(J V, output)``: the k JVPs ``(k, *output.shape)`` and the output with its graph
        (``output`` when given, kept; else recorded on the way)."""
        if self._forward_ok:
            try:
                return self._forward_jvps(model, forward, leaves, tangents, output)
            except (NotImplementedError, RuntimeError) as error:
                if _is_oom(error) or self.jvp_method == "forward" or not _lacks_forward_ad(error):
                    raise
                self._forward_ok = False  # no forward-mode AD in this model: exact fallback
        if output is None:
            with reparametrized(model, leaves):
                output = forward()
        return self._double_backward_jvps(output, list(leaves.values()), tangents), output

    def _double_backward_jvps(self, output, leaf_list, tangents):
        if self._batched_vjp_ok and tangents[0].shape[0] > 1:
            try:
                return double_backward_jvps(output, leaf_list, tangents, batched=True)
            except RuntimeError as error:
                if _is_oom(error) or not is_vmap_failure(error):
                    raise
                jvps = double_backward_jvps(output, leaf_list, tangents, batched=False)
                self._batched_vjp_ok = False  # the loop worked: no vmap over this backward
                return jvps
        return double_backward_jvps(output, leaf_list, tangents, batched=False)

    def _vjp(self, output, leaf_list, cotangents, *, retain_graph=False):
        if self._batched_vjp_ok and cotangents.shape[0] > 1:
            try:
                return vjp_columns(
                    output, leaf_list, cotangents, batched=True, retain_graph=retain_graph
                )
            except RuntimeError as error:
                if _is_oom(error) or not is_vmap_failure(error):
                    raise
                columns = vjp_columns(
                    output, leaf_list, cotangents, batched=False, retain_graph=retain_graph
                )
                self._batched_vjp_ok = False  # the loop worked: no vmap over this backward
                return columns
        return vjp_columns(output, leaf_list, cotangents, batched=False, retain_graph=retain_graph)

    def _forward_jvps(self, model, forward, leaves, tangents, output):
        """The JVPs by forward-mode AD. Without a kept ``output``, the first looped column's
        dual forward records the output's graph for the VJP (one forward fewer); every other
        dual forward records none."""
        jvps = None
        batched_failed = False
        if tangents[0].shape[0] > 1 and self._batched_jvp_ok:
            try:
                jvps = self._batched_jvps(model, forward, leaves, tangents)
            except RuntimeError as error:
                if _is_oom(error) or not (is_vmap_failure(error) or _lacks_forward_ad(error)):
                    raise
                batched_failed = True  # decided once the column loop below has worked
        if jvps is None:
            names = list(leaves)
            columns = []
            for j in range(tangents[0].shape[0]):
                tangent = {name: t[j] for name, t in zip(names, tangents)}
                jvp = None
                if output is None and self.record_output_in_dual_forward:
                    try:
                        output, jvp = forward_with_tangent(forward, model, leaves, tangent)
                    except (torch.OutOfMemoryError, RuntimeError) as error:
                        if not _is_oom(error):
                            raise
                    if jvp is None:  # out of memory: retried below, outside the handler
                        self._record_less(model)
                if jvp is None:
                    jvp = jvp_without_graph(forward, model, leaves, tangent)
                columns.append(jvp)
            jvps = stack_columns(columns)
            if batched_failed:
                self._batched_jvp_ok = False  # the column loop worked: vmap is what failed
        if output is None:
            with reparametrized(model, leaves):
                output = forward()
        return jvps, output

    def _record_less(self, model: torch.nn.Module) -> None:
        """A recorded dual forward ran out of memory (it holds the tangent computations too):
        from now on, graph-free JVPs and one plain forward, with a warning."""
        self.record_output_in_dual_forward = False
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(
            "out of memory in the dual-number forward pass that also records the backward "
            "graph (it holds the tangent computations too); the products now use a JVP that "
            "records no graph plus one plain forward pass (about 15% slower, a third of the "
            "memory). cache_graph=True is faster and lighter still.",
            RuntimeWarning,
            stacklevel=6,
        )

    def _batched_jvps(self, model, forward, leaves, tangents):
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
