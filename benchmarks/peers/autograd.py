"""The hand-rolled baseline a user would write with plain ``torch.autograd``: double backward.

- Hessian: ``g = grad(L, theta, create_graph=True)``, then ``H v = grad(g, theta, v)``.
- GGN: ``J v`` by the double-backward trick (differentiate ``u -> J^T u`` at ``u = 0``), the loss
  Hessian on the output by double backward on the loss of the detached output, then ``J^T`` by
  one backward.
- Empirical Fisher: the same trick on the vector of per-sample losses: ``G v``, then
  ``G^T (G v) / N``.

Batches are weighted by their share of loss rows (the losses are means over rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.models import Problem
from benchmarks.peers import MatvecFn, Unsupported, flat, split

LABEL = "torch.autograd (hand-rolled)"
MUTATES_MODEL = False


def version() -> str:
    return torch.__version__


def _jvp_by_double_backward(
    output: torch.Tensor, params: list[torch.nn.Parameter], tangents: list[torch.Tensor]
) -> torch.Tensor:
    """``J v`` of ``output`` w.r.t. ``params``: differentiate the linear map ``u -> J^T u``."""
    dummy = torch.zeros_like(output, requires_grad=True)
    transposed = torch.autograd.grad(output, params, dummy, create_graph=True)
    (jvp,) = torch.autograd.grad(transposed, dummy, tangents, retain_graph=True)
    return jvp


def _hessian(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
    params = problem.params
    loss = problem.criterion(problem.model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, v)


def _ggn(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
    params = problem.params
    output = problem.model(inputs)
    jvp = _jvp_by_double_backward(output, params, v)
    leaf = output.detach().requires_grad_(True)
    (output_grad,) = torch.autograd.grad(problem.criterion(leaf, targets), leaf, create_graph=True)
    (hjv,) = torch.autograd.grad(output_grad, leaf, jvp)
    return torch.autograd.grad(output, params, hjv)


def _ef(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
    params = problem.params
    losses = F.cross_entropy(problem.model(inputs), targets, reduction="none")
    jvp = _jvp_by_double_backward(losses, params, v)
    return torch.autograd.grad(losses, params, jvp / losses.numel())


_PRODUCTS = {"hessian": _hessian, "ggn": _ggn, "ef": _ef}


def make_matvec(problem: Problem, curvature: str) -> MatvecFn:
    if curvature not in _PRODUCTS:
        raise Unsupported(f"unknown curvature {curvature!r}")
    if not isinstance(problem.criterion, torch.nn.CrossEntropyLoss) and curvature == "ef":
        raise Unsupported("the hand-rolled EF assumes cross-entropy")
    product = _PRODUCTS[curvature]
    total_rows = sum(targets.numel() for _, targets in problem.batches)

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        tangents = split(vector, problem.params)
        result = torch.zeros_like(vector)
        for inputs, targets in problem.batches:
            pieces = product(problem, inputs, targets, tangents)
            result.add_(flat(pieces), alpha=targets.numel() / total_rows)
        return result

    return matvec
