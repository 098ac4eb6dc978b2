"""BackPACK (``backpack-for-pytorch``): its Hessian-free autodiff products
(``backpack.hessianfree``: Hessian by R-op on the gradient, GGN by R-op, loss Hessian, L-op) and,
for the empirical Fisher, per-sample gradients from its ``BatchGrad`` extension
(``G^T (G v)`` on them). BatchGrad needs every parameter in a layer it knows and one sample per
batch item. BackPACK has no eigen, trace or density routines."""

from __future__ import annotations

import torch

from benchmarks.models import Problem
from benchmarks.peers import MatvecFn, Unsupported, flat, split

LABEL = "BackPACK"
MUTATES_MODEL = True  # extend() registers hooks; BatchGrad writes .grad and .grad_batch


def version() -> str:
    from importlib.metadata import version as dist_version

    import backpack  # noqa: F401

    return dist_version("backpack-for-pytorch")


def _hessian(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
    from backpack.hessianfree.hvp import hessian_vector_product

    loss = problem.criterion(problem.model(inputs), targets)
    return hessian_vector_product(loss, problem.params, v)


def _ggn(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    output = problem.model(inputs)
    loss = problem.criterion(output, targets)
    return ggn_vector_product_from_plist(loss, output, problem.params, v)


def _check_batch_grad(problem: Problem) -> None:
    """Unsupported unless BatchGrad can give one gradient per loss row."""
    if problem.rows_per_input > 1:
        raise Unsupported(
            "BatchGrad gives one gradient per batch item (a sequence); the empirical Fisher "
            "here is per token"
        )


def _ef_factory(problem: Problem):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    _check_batch_grad(problem)
    extend(problem.model)
    criterion = extend(problem.criterion.__class__(reduction=problem.criterion.reduction))

    def product(inputs: torch.Tensor, targets: torch.Tensor, v: list[torch.Tensor]):
        loss = criterion(problem.model(inputs), targets)
        with backpack(BatchGrad()):
            loss.backward()
        # grad_batch rows are gradients of the batch-mean loss: g_i / B
        rows = targets.shape[0]
        gradients = [getattr(p, "grad_batch") for p in problem.params]  # noqa: B009
        per_sample = torch.cat([g.reshape(rows, -1) for g in gradients], dim=1)
        for param in problem.params:
            param.grad = None
            delattr(param, "grad_batch")
        return split(rows * (per_sample.T @ (per_sample @ flat(v))), problem.params)

    return product


def make_matvec(problem: Problem, curvature: str) -> MatvecFn:
    if curvature == "hessian":

        def product(inputs, targets, v):
            return _hessian(problem, inputs, targets, v)
    elif curvature == "ggn":

        def product(inputs, targets, v):
            return _ggn(problem, inputs, targets, v)
    elif curvature == "ef":
        product = _ef_factory(problem)
    else:
        raise Unsupported(f"unknown curvature {curvature!r}")
    total_rows = sum(targets.numel() for _, targets in problem.batches)

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        tangents = split(vector, problem.params)
        result = torch.zeros_like(vector)
        for inputs, targets in problem.batches:
            result.add_(
                flat(product(inputs, targets, tangents)), alpha=targets.numel() / total_rows
            )
        return result

    return matvec
