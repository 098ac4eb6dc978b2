"""Products composed from parts chosen at construction (torch_linop/products): capabilities are
probed once and then fixed, the MC Fisher is the GGN with a sampled middle, and the empirical
Fisher takes every JVP method the GGN has (checked against dense float64 matrices)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import torch_linop.products.jvp as jvp_module
from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    ProductOptions,
)
from torch_linop._context import reparametrized
from torch_linop.products import Capability
from torch_linop.reference import dense_empirical_fisher, dense_ggn, dense_hessian

EXACT = 1e-10


def block(size: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, columns, generator=generator, dtype=torch.float64)


class SoftplusWithoutForwardAD(torch.autograd.Function):
    """Softplus with a differentiable backward but no ``jvp``: no forward-mode AD."""

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class NoForwardAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(SoftplusWithoutForwardAD.apply(self.first(x)))


def test_capability_decides_on_the_first_success_and_never_reprobes():
    capability = Capability("test path")
    calls = {"fast": 0, "fallback": 0}

    def fast():
        calls["fast"] += 1
        raise RuntimeError("any text at all")

    def fallback():
        calls["fallback"] += 1
        return "fallback"

    for _ in range(4):
        assert capability.choose(fast, fallback) == "fallback"
    assert calls == {"fast": 1, "fallback": 4}
    assert capability.supported is False and capability.probes == 1
    assert capability.reason == "RuntimeError: any text at all"


def test_capability_stays_undecided_while_the_fallback_fails_too():
    """An error of the user's model raises in both paths: it propagates and decides nothing."""
    capability = Capability("test path")

    def broken():
        raise ValueError("the model is broken")

    for attempt in (1, 2):
        with pytest.raises(ValueError, match="the model is broken"):
            capability.choose(broken, broken)
        assert capability.supported is None and capability.probes == attempt
    assert capability.choose(lambda: "fast", broken) == "fast"
    assert capability.supported is True


def test_capability_lets_out_of_memory_through():
    capability = Capability("test path")

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        capability.choose(out_of_memory, lambda: "fallback")
    assert capability.supported is None


def test_forward_ad_is_probed_once_for_a_model_without_it(make_data, rel_err, monkeypatch):
    """Three products of 1 and 3 columns: forward mode is tried in the first only."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = NoForwardAD().double()
    data = make_data((4,))
    from torch_linop import supervised_loss

    loss = supervised_loss(F.cross_entropy)
    operator = GGNOperator(model, data, loss)
    attempts = []
    forward_mode = operator._sandwich.jvp.forward_mode
    original = type(forward_mode).__call__

    def counted(self, *args, **kwargs):
        attempts.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(forward_mode), "__call__", counted)
    reference = dense_ggn(model, data, loss)
    vectors = block(operator.shape[0], 3, seed=1)
    for columns in (vectors[:, 0], vectors, vectors[:, 1]):
        assert rel_err(operator @ columns, reference @ columns) <= EXACT
    assert len(attempts) == 1  # the first batch of the first product, and never again
    forward_ad = operator.capabilities.forward_ad
    assert forward_ad.supported is False and forward_ad.probes == 1


def test_vmap_of_jvps_is_probed_once(make_case, rel_err, monkeypatch):
    case = make_case("mlp")
    operator = GGNOperator(case.model, case.data, case.loss)
    calls = []

    def no_vmap(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no batching rule (whatever the message says)")

    monkeypatch.setattr(jvp_module, "vmapped_jvps", no_vmap)
    reference = dense_ggn(case.model, case.data, case.loss)
    vectors = block(operator.shape[0], 3, seed=2)
    for _ in range(3):
        assert rel_err(operator @ vectors, reference @ vectors) <= EXACT
    assert len(calls) == 1
    capabilities = operator.capabilities
    assert capabilities.vmap_jvp.supported is False and capabilities.vmap_jvp.probes == 1
    assert capabilities.forward_ad.supported is True and capabilities.forward_ad.probes == 1
    assert capabilities.batched_backward.supported is True
    assert capabilities.batched_backward.probes == 1


def test_batched_backward_of_the_hessian_is_probed_once(make_case, rel_err, monkeypatch):
    case = make_case("mlp")
    operator = HessianOperator(case.model, case.data, case.loss)
    refused = []
    grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(1)
            raise RuntimeError("batched gradients are not available here")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    reference = dense_hessian(case.model, case.data, case.loss)
    vectors = block(operator.shape[0], 2, seed=3)
    for _ in range(3):
        assert rel_err(operator @ vectors, reference @ vectors) <= EXACT
    assert len(refused) == 1
    assert (
        operator.capabilities.batched_backward.supported is False
        and operator.capabilities.batched_backward.probes == 1
    )


def dense_sampled_ggn(model, data, loss, mc_samples: int, seed: int) -> torch.Tensor:
    """``sum_b w_b J_b^T M_b J_b`` with ``M_b`` the loss's sampled output Hessian applied to the
    identity (the generator seeded once, batches in order) and ``J_b`` by ``jacrev``."""
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    generator = torch.Generator().manual_seed(seed)
    total_samples = sum(len(targets) for _, targets in data)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for inputs, targets in data:

        def output_of(vector, inputs=inputs):
            values = {n: c.view(s) for n, c, s in zip(names, torch.split(vector, sizes), shapes)}
            with reparametrized(model, values):
                return model(inputs)

        output = output_of(flat).detach()
        jacobian = jacrev(output_of)(flat).reshape(output.numel(), -1)
        identity = torch.eye(output.numel(), dtype=output.dtype).reshape(-1, *output.shape)
        middle = loss.sampled_output_hessian_vector_product(
            output, (inputs, targets), identity, generator, mc_samples
        ).reshape(output.numel(), output.numel())
        total += len(targets) / total_samples * jacobian.T @ middle @ jacobian
    return total


@pytest.mark.parametrize(
    "options",
    [{}, {"jvp_method": "double_backward"}, {"cache_graph": True}],
    ids=["auto", "double_backward", "cache_graph"],
)
def test_mc_fisher_is_the_ggn_with_a_sampled_middle(make_case, dense, rel_err, options):
    case = make_case("mlp")
    mc_fisher = MCFisherOperator(case.model, case.data, case.loss, mc_samples=3, seed=11, **options)
    expected = dense_sampled_ggn(case.model, case.data, case.loss, mc_samples=3, seed=11)
    assert rel_err(dense(mc_fisher), expected) <= EXACT
    assert rel_err(dense(mc_fisher), expected) <= EXACT  # re-seeded: the same matrix again
    assert rel_err(expected, dense_ggn(case.model, case.data, case.loss)) > 1e-3  # not the GGN


def test_mc_fisher_has_no_cuda_graph_option(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError, match="MCFisherOperator has no CUDA-graph replay"):
        MCFisherOperator(
            case.model,
            case.data,
            case.loss,
            cache_graph=True,
            options=ProductOptions(cuda_graph=True),
        )


@pytest.mark.parametrize(
    ("jvp_method", "tolerance"),
    [
        ("auto", EXACT),
        ("forward", EXACT),
        ("double_backward", EXACT),
        ("finite_difference", 1e-7),
        ("forward_difference", 1e-5),
    ],
)
def test_empirical_fisher_takes_every_jvp_method_of_the_ggn(
    make_case, dense, rel_err, jvp_method, tolerance
):
    case = make_case("mlp")
    operator = EmpiricalFisherOperator(case.model, case.data, case.loss, jvp_method=jvp_method)
    expected = dense_empirical_fisher(case.model, case.data, case.loss)
    assert rel_err(dense(operator), expected) <= tolerance


def test_empirical_fisher_refuses_an_unknown_jvp_method_naming_the_valid_ones(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError) as raised:
        EmpiricalFisherOperator(case.model, case.data, case.loss, jvp_method="reverse")
    message = str(raised.value)
    assert message.startswith("EmpiricalFisherOperator: jvp_method must be one of")
    for valid in ("auto", "forward", "double_backward", "finite_difference", "forward_difference"):
        assert repr(valid) in message
    assert "'reverse'" in message


def test_empirical_fisher_refuses_to_replay_a_difference_jvp(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError, match="cannot capture jvp_method='finite_difference'"):
        EmpiricalFisherOperator(
            case.model,
            case.data,
            case.loss,
            jvp_method="finite_difference",
            cache_graph=True,
            cuda_graph=True,
        )
