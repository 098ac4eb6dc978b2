"""Class-weighted cross-entropy over several batches is the global weighted mean
``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (batches weigh their total class weight, not their size),
and the empirical Fisher of weighted criteria: ``pos_weight`` BCE works, class weights refuse."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import EmpiricalFisherOperator, GGNOperator, HessianOperator, supervised_loss

DTYPE = torch.float64
CLASS_WEIGHT = torch.tensor([0.2, 1.0, 5.0], dtype=DTYPE)


def mlp(outputs: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(DTYPE)


def batches(targets: str = "classes"):
    generator = torch.Generator().manual_seed(2)
    data = []
    for size in (5, 3, 4):
        x = torch.randn(size, 4, generator=generator, dtype=DTYPE)
        if targets == "classes":
            y = torch.randint(0, 3, (size,), generator=generator)
        else:
            y = torch.rand(size, 2, generator=generator, dtype=DTYPE).round()
        data.append((x, y))
    data[0][1][0] = -1  # an ignored target (only used with ignore_index=-1)
    return data


def concatenated_hessian(model, data, loss_of_output) -> torch.Tensor:
    """Dense Hessian of the loss on all data as one batch (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])

    def loss_of(flat):
        values = {n: c.view(params[n].shape) for n, c in zip(params, flat.split(sizes))}
        return loss_of_output(torch.func.functional_call(model, values, (x,)), y)

    return torch.func.hessian(loss_of)(torch.cat([p.reshape(-1) for p in params.values()]))


CRITERIA = {
    "module": nn.CrossEntropyLoss(weight=CLASS_WEIGHT, ignore_index=-1),
    "partial": functools.partial(F.cross_entropy, weight=CLASS_WEIGHT, ignore_index=-1),
}


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_class_weighted_cross_entropy_is_the_global_weighted_mean(criterion):
    model, data = mlp(), batches()
    expected = concatenated_hessian(model, data, CRITERIA[criterion])
    loss = supervised_loss(CRITERIA[criterion])
    for operator in (
        HessianOperator(model, data, loss),
        HessianOperator(model, data, loss, method="forward"),
    ):
        matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
        assert float((matrix - expected).norm() / expected.norm()) < 1e-12
    # a linear model: the GGN is the Hessian
    linear = nn.Linear(4, 3).to(DTYPE)
    ggn = GGNOperator(linear, data, loss)
    expected = concatenated_hessian(linear, data, CRITERIA[criterion])
    matrix = ggn @ torch.eye(ggn.shape[0], dtype=DTYPE)
    assert float((matrix - expected).norm() / expected.norm()) < 1e-12


def test_empirical_fisher_of_class_weighted_cross_entropy_refuses():
    loss = supervised_loss(CRITERIA["module"])
    operator = EmpiricalFisherOperator(mlp(), batches(), loss)
    with pytest.raises(NotImplementedError, match="class-weighted criterion"):
        operator @ torch.ones(operator.shape[0], dtype=DTYPE)


def test_empirical_fisher_of_bce_with_pos_weight():
    """``(1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of sample i's mean BCE over outputs."""
    model, data = mlp(outputs=2), batches(targets="multilabel")
    pos_weight = torch.tensor([3.0, 0.5], dtype=DTYPE)
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    operator = EmpiricalFisherOperator(model, data, supervised_loss(criterion))
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])

    def per_sample(flat):
        values = {n: c.view(params[n].shape) for n, c in zip(params, flat.split(sizes))}
        logits = torch.func.functional_call(model, values, (x,))
        elementwise = F.binary_cross_entropy_with_logits(
            logits, y, pos_weight=pos_weight, reduction="none"
        )
        return elementwise.mean(1)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    gradients = torch.func.jacrev(per_sample)(flat)
    expected = gradients.T @ gradients / x.shape[0]
    matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
    assert float((matrix - expected).norm() / expected.norm()) < 1e-12
