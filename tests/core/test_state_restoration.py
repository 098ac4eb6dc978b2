"""Products never change the model: parameters (bitwise, and the same objects), requires_grad,
``.grad``, training mode and BatchNorm running statistics of a train-mode model are as before,
also after a product that raises inside the model's forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    supervised_loss,
)

DTYPE = torch.float64
FAILING_BATCH_SIZE = 7


class TrainModeNet(nn.Module):
    """Linear -> BatchNorm (train mode) -> tanh -> linear -> frozen linear. Raises after the
    BatchNorm has run (and updated its statistics) when a batch holds 7 samples."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5)
        self.second = nn.Linear(5, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        hidden = self.norm(self.first(x))
        if x.shape[0] == FAILING_BATCH_SIZE:
            raise RuntimeError("boom inside the model")
        return self.frozen(self.second(torch.tanh(hidden)))


def snapshot(model):
    return {
        "params": {
            n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model, before):
    for name, param in model.named_parameters():
        original, values, requires_grad = before["params"][name]
        assert param is original, name  # the same Parameter object is back in place
        assert torch.equal(param.detach(), values), name  # bitwise
        assert param.requires_grad is requires_grad, name
        grad = before["grads"][name]
        assert (param.grad is None) if grad is None else torch.equal(param.grad, grad), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before["buffers"][name]), name
    assert [m.training for m in model.modules()] == before["training"]


OPERATORS = {
    "hessian_autograd": (HessianOperator, {}),
    "hessian_forward": (HessianOperator, {"method": "forward"}),
    "hessian_finite_difference": (HessianOperator, {"method": "finite_difference"}),
    "ggn_auto": (GGNOperator, {}),
    "ggn_double_backward": (GGNOperator, {"jvp_method": "double_backward"}),
    "ggn_finite_difference": (GGNOperator, {"jvp_method": "finite_difference"}),
    "empirical_fisher": (EmpiricalFisherOperator, {}),
    "mc_fisher": (MCFisherOperator, {"mc_samples": 2}),
}


def build(name, model, data, loss):
    operator_class, options = OPERATORS[name]
    return operator_class(model, data, loss, **options)


@pytest.fixture
def train_mode_model(make_data):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TrainModeNet().to(DTYPE).train()
    model.second.weight.grad = torch.full_like(model.second.weight, 0.5)  # must survive
    return model, make_data((4,)), supervised_loss(F.cross_entropy)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_products_leave_the_model_unchanged(train_mode_model, name):
    model, data, loss = train_mode_model
    before = snapshot(model)
    operator = build(name, model, data, loss)
    size = operator.shape[0]
    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(size, 3, generator=generator, dtype=DTYPE)
    operator @ columns[:, 0]
    operator @ columns
    operator.matvec(columns[:, 1].numpy())
    assert_unchanged(model, before)

    failing = [data[0], (torch.zeros(FAILING_BATCH_SIZE, 4, dtype=DTYPE), data[1][1][:1].repeat(7))]
    failing_operator = build(name, model, failing, loss)
    for probe in (columns[:, 0], columns):
        with pytest.raises(RuntimeError, match="boom inside the model"):
            failing_operator @ probe
        assert_unchanged(model, before)


def test_check_deterministic_leaves_batchnorm_statistics_alone(train_mode_model):
    model, data, loss = train_mode_model
    before = snapshot(model)
    HessianOperator(model, data, loss, check_deterministic=True)  # BatchNorm in train mode is
    assert_unchanged(model, before)  # deterministic given the batch: accepted, stats untouched


def test_train_mode_products_use_batch_statistics(train_mode_model, dense, rel_err):
    """In train mode the Hessian is that of the batch-statistics network (checked against an
    independent central difference of gradients), and matmat agrees with matvecs."""
    model, data, loss = train_mode_model
    operator = HessianOperator(model, data, loss)
    matrix = dense(operator)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    total = sum(int(y.numel()) for _, y in data)

    def gradient(vector):
        leaf = vector.clone().requires_grad_(True)
        values = dict(zip(names, (c.view_as(params[n]) for n, c in zip(names, leaf.split(sizes)))))
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        value = sum(
            F.cross_entropy(
                torch.func.functional_call(model, {**values, **frozen, **buffers}, (x,)),
                y,
                reduction="sum",
            )
            for x, y in data
        )
        return torch.autograd.grad(value / total, leaf)[0]

    generator = torch.Generator().manual_seed(2)
    direction = torch.randn(flat.numel(), generator=generator, dtype=DTYPE)
    step = 1e-5
    central = (gradient(flat + step * direction) - gradient(flat - step * direction)) / (2 * step)
    assert rel_err(matrix @ direction, central) <= 1e-7
    forward = HessianOperator(model, data, loss, method="forward")
    assert rel_err(forward @ direction, matrix @ direction) <= 1e-10


class AliasedNet(nn.Module):
    """A submodule registered under two names (``alias = body``, as TransformerLens's bridge
    registers ``blocks`` and ``layers``) and a weight tied between two modules. Raises when a
    batch holds 7 samples, after the aliased module has run."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.alias = self.body
        self.head = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)
        self.tail.weight = self.head.weight  # genuinely tied: one Parameter, two modules

    def forward(self, x):
        hidden = torch.tanh(self.alias(x))
        if x.shape[0] == FAILING_BATCH_SIZE:
            raise RuntimeError("boom inside the model")
        return self.tail(torch.tanh(self.head(hidden)))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_products_keep_the_parameters_of_aliased_submodules(make_data, dense, rel_err, name):
    """The same ``nn.Parameter`` objects are in place after products and after a product that
    raised, under every name they are reachable by; the products still see the tied weight."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AliasedNet().to(DTYPE)
    data, loss = make_data((4,)), supervised_loss(F.cross_entropy)
    every_name = dict(model.named_parameters(remove_duplicate=False))
    before = snapshot(model)
    operator = build(name, model, data, loss)
    operator @ torch.ones(operator.shape[0], dtype=DTYPE)
    failing = [data[0], (torch.zeros(FAILING_BATCH_SIZE, 4, dtype=DTYPE), data[1][1][:1].repeat(7))]
    with pytest.raises(RuntimeError, match="boom inside the model"):
        build(name, model, failing, loss) @ torch.ones(operator.shape[0], dtype=DTYPE)
    assert_unchanged(model, before)
    for alias_name, param in model.named_parameters(remove_duplicate=False):
        assert param is every_name[alias_name], alias_name
        assert isinstance(param, nn.Parameter), alias_name
    assert model.tail.weight is model.head.weight
    if name == "hessian_autograd":  # the tied weight counts once, with both uses
        assert rel_err(dense(operator), functional_call_hessian(model, data)) < 1e-12


def functional_call_hessian(model, data):
    """Dense Hessian of the mean cross-entropy from ``torch.func`` (torch's own functional_call
    ties the weights), over the deduplicated trainable parameters."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in params.items()}
    sizes = [p.numel() for p in params.values()]
    total = sum(int(y.numel()) for _, y in data)

    def loss_of(flat):
        values = {n: c.view(shapes[n]) for n, c in zip(params, flat.split(sizes))}
        return (
            sum(
                F.cross_entropy(torch.func.functional_call(model, values, (x,)), y, reduction="sum")
                for x, y in data
            )
            / total
        )

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.func.hessian(loss_of)(flat)
