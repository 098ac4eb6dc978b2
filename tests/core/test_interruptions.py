"""Interrupted products leave the model exactly as it was: Ctrl-C (KeyboardInterrupt), an
exception and a (simulated) out-of-memory error raised inside the model's forward pass, in a
single product of every operator and in the middle of solver runs, restore the parameters
(bitwise, the same objects), requires_grad flags, ``.grad``, per-module training flags and
buffers. Out-of-memory errors come back as ``torch.OutOfMemoryError`` naming what helps."""

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
from torch_linop.solvers import lanczos, spectral_density, trace

DTYPE = torch.float64


class Net(nn.Module):
    """Linear -> BatchNorm (train mode: updates its buffers) -> tanh -> linear (eval mode) ->
    frozen linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5)
        self.second = nn.Linear(5, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.second(torch.tanh(self.norm(self.first(x)))))


FAILURES = {
    "keyboard_interrupt": lambda: KeyboardInterrupt(),
    "exception": lambda: RuntimeError("boom inside the model"),
    "out_of_memory": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB"),
}
EXPECTED = {
    "keyboard_interrupt": KeyboardInterrupt,
    "exception": RuntimeError,
    "out_of_memory": torch.OutOfMemoryError,
}
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


class FailAfter:
    """A forward hook on the BatchNorm (so it has already updated its running statistics) that
    raises ``failure`` from its ``calls``-th call on (every time: an operator that retries a
    batched product column by column meets the error again)."""

    def __init__(self, failure: str, calls: int) -> None:
        self.failure, self.calls, self.seen = failure, calls, 0

    @property
    def fired(self) -> bool:
        return self.seen >= self.calls

    def __call__(self, *_: object) -> None:
        self.seen += 1
        if self.seen >= self.calls:
            raise FAILURES[self.failure]()


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {
            n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for name, param in model.named_parameters():
        original, values, requires_grad = before["params"][name]
        assert param is original, name
        assert torch.equal(param.detach(), values), name
        assert param.requires_grad is requires_grad, name
        grad = before["grads"][name]
        assert (param.grad is None) if grad is None else torch.equal(param.grad, grad), name
    for name, buffer in model.named_buffers():
        original, values = before["buffers"][name]
        assert buffer is original and torch.equal(buffer, values), name
    assert [m.training for m in model.modules()] == before["training"]
    assert sorted(dict(model.named_parameters())) == sorted(before["params"])


@pytest.fixture
def setup(make_data):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Net().to(DTYPE).train()
    model.second.eval()  # mixed per-module training flags must survive as they are
    model.first.weight.grad = torch.full_like(model.first.weight, 0.25)
    with torch.no_grad():
        model.norm.running_mean.fill_(0.1)
    return model, make_data((4,)), supervised_loss(F.cross_entropy)


def check_out_of_memory_message(error: BaseException) -> None:
    message = str(error)
    for knob in ("batch_size", "num_batches", "block_size", "finite_difference", "GGN"):
        assert knob in message, knob
    assert "return_eigenvectors=False" in message and "basis_device='cpu'" in message
    assert isinstance(error.__cause__, torch.OutOfMemoryError)  # the original, chained
    assert "Tried to allocate 8 GiB" in message


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", list(OPERATORS))
def test_failed_product_leaves_the_model_unchanged(setup, name, failure):
    model, data, loss = setup
    operator_class, options = OPERATORS[name]
    operator = operator_class(model, data, loss, **options)
    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(operator.shape[0], 3, generator=generator, dtype=DTYPE)
    before = snapshot(model)
    expected_product = operator @ columns
    for calls in (1, 2):  # the first batch, or the second after one batch succeeded
        for probe in (columns[:, 0], columns):
            hook = FailAfter(failure, calls)
            handle = model.norm.register_forward_hook(hook)
            try:
                with pytest.raises(EXPECTED[failure]) as raised:
                    operator @ probe
            finally:
                handle.remove()
            assert hook.fired
            assert_unchanged(model, before)
            if failure == "out_of_memory":
                check_out_of_memory_message(raised.value)
    # the operator still works and computes the same matrix
    torch.testing.assert_close(operator @ columns, expected_product, rtol=1e-12, atol=1e-14)
    assert_unchanged(model, before)


SOLVER_RUNS = {
    "lanczos": lambda op: lanczos(op, 3, seed=0),
    "trace": lambda op: trace(op, 12, seed=0, block_size=2),
    "spectral_density": lambda op: spectral_density(op, num_runs=2, lanczos_steps=8, seed=0),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("solver", list(SOLVER_RUNS))
@pytest.mark.parametrize("name", ["hessian_autograd", "ggn_auto"])
def test_failure_inside_a_solver_run_leaves_the_model_unchanged(setup, name, solver, failure):
    model, data, loss = setup
    operator_class, options = OPERATORS[name]
    operator = operator_class(model, data, loss, **options)
    before = snapshot(model)
    hook = FailAfter(failure, calls=9)  # two forwards per product: mid-run
    handle = model.norm.register_forward_hook(hook)
    try:
        with pytest.raises(EXPECTED[failure]) as raised:
            SOLVER_RUNS[solver](operator)
    finally:
        handle.remove()
    assert hook.fired
    assert_unchanged(model, before)
    if failure == "out_of_memory":
        check_out_of_memory_message(raised.value)


def test_ctrl_c_in_a_checkpointed_run_then_resume(setup, tmp_path):
    """Ctrl-C in the middle of a checkpointed Lanczos run: the model is unchanged, and the
    resumed run returns exactly the uninterrupted result."""
    model, data, loss = setup
    model.eval()  # a fixed matrix for the comparison
    before = snapshot(model)
    reference = lanczos(HessianOperator(model, data, loss), 3, seed=0)
    hook = FailAfter("keyboard_interrupt", calls=30)
    handle = model.norm.register_forward_hook(hook)
    path = tmp_path / "lanczos.pt"
    try:
        with pytest.raises(KeyboardInterrupt):
            lanczos(
                HessianOperator(model, data, loss), 3, seed=0, checkpoint=path, checkpoint_every=2
            )
    finally:
        handle.remove()
    assert_unchanged(model, before)
    assert path.exists()
    resumed = lanczos(HessianOperator(model, data, loss), 3, seed=0, checkpoint=path)
    assert (resumed.eigenvalues == reference.eigenvalues).all()
    assert torch.equal(resumed.eigenvectors, reference.eigenvectors)
    assert resumed.num_matvecs == reference.num_matvecs
