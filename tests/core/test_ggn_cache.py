"""``GGNOperator(cache_graph=True)`` (the MC Fisher, its subclass, and the empirical Fisher): products on the kept
per-batch forward graphs equal the uncached products and independent dense GGNs (float64, 1e-10)
for every JVP method, the graphs are kept between products and rebuilt when the model or data
change, JVPs record no graph, and a failed product leaves no cache and the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_linop._autodiff as autodiff_module
from torch_linop import EmpiricalFisherOperator, GGNOperator, MCFisherOperator
from torch_linop._autodiff import jvp_without_graph, make_leaves
from torch_linop.reference import dense_empirical_fisher, dense_ggn

TOL = 1e-10


def random_block(size: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, columns, generator=generator, dtype=torch.float64)


def test_cached_products_equal_uncached_and_dense(tiny_case, dense, rel_err):
    """Every tiny model, LSTM included (its products fall back to double-backward JVPs, which
    run on the kept graph too)."""
    model, data, loss = tiny_case.model, tiny_case.data, tiny_case.loss
    cached = GGNOperator(model, data, loss, cache_graph=True)
    reference = dense_ggn(model, data, loss)
    assert rel_err(dense(cached), reference) <= TOL  # builds the graphs, then a block product
    graphs = cached._graphs
    block = random_block(cached.shape[0], 3, seed=2)
    for _ in range(2):  # the kept graphs serve every later product, one column or several
        assert rel_err(cached @ block[:, 0], reference @ block[:, 0]) <= TOL
        assert rel_err(cached @ block, reference @ block) <= TOL
    assert cached._graphs is graphs and len(graphs) == len(data)


@pytest.mark.parametrize("jvp_method", ["forward", "double_backward"])
def test_exact_jvp_methods_on_the_kept_graph(make_case, dense, rel_err, jvp_method):
    case = make_case("cnn_batchnorm_eval")
    cached = GGNOperator(case.model, case.data, case.loss, jvp_method=jvp_method, cache_graph=True)
    reference = dense_ggn(case.model, case.data, case.loss)
    vector = random_block(cached.shape[0], 1, seed=3)[:, 0]
    for _ in range(2):
        assert rel_err(cached @ vector, reference @ vector) <= TOL
    assert rel_err(dense(cached), reference) <= TOL


@pytest.mark.parametrize("jvp_method", ["finite_difference", "forward_difference"])
def test_finite_difference_jvps_on_the_kept_graph(make_case, rel_err, jvp_method):
    """The same differences as the uncached operator (the one-sided one against the kept
    output), so the same numbers to rounding; both within the difference error of the GGN."""
    case = make_case("mlp")
    cached = GGNOperator(case.model, case.data, case.loss, jvp_method=jvp_method, cache_graph=True)
    uncached = GGNOperator(case.model, case.data, case.loss, jvp_method=jvp_method)
    reference = dense_ggn(case.model, case.data, case.loss)
    block = random_block(cached.shape[0], 2, seed=4)
    for _ in range(2):
        product = cached @ block
        assert rel_err(product, uncached @ block) <= 1e-12
        assert rel_err(product, reference @ block) <= 1e-4


def test_mc_fisher_on_the_kept_graph_is_the_same_fixed_matrix(make_case, rel_err):
    case = make_case("mlp")
    cached = MCFisherOperator(case.model, case.data, case.loss, mc_samples=3, cache_graph=True)
    uncached = MCFisherOperator(case.model, case.data, case.loss, mc_samples=3)
    block = random_block(cached.shape[0], 2, seed=5)
    expected = uncached @ block
    for _ in range(2):  # the targets are drawn again, from the same seed, in every product
        assert rel_err(cached @ block, expected) <= TOL


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm_eval", "lstm"])
def test_empirical_fisher_on_the_kept_graph(make_case, dense, rel_err, name):
    case = make_case(name)
    cached = EmpiricalFisherOperator(case.model, case.data, case.loss, cache_graph=True)
    reference = dense_empirical_fisher(case.model, case.data, case.loss)
    vector = random_block(cached.shape[0], 1, seed=8)[:, 0]
    for _ in range(2):
        assert rel_err(cached @ vector, reference @ vector) <= TOL
    assert rel_err(dense(cached), reference) <= TOL
    assert cached._graphs is not None and len(cached._graphs) == len(case.data)


def test_jvps_record_no_graph(make_case):
    """A recorded dual forward would also record the tangent computations (and hold their
    inputs); the JVPs of the cached mode record nothing."""
    case = make_case("mlp")
    leaves = make_leaves(dict(case.model.named_parameters()))
    tangent = {name: torch.ones_like(leaf) for name, leaf in leaves.items()}
    x = case.data[0][0]
    jvp = jvp_without_graph(lambda: case.model(x), case.model, leaves, tangent)
    assert not jvp.requires_grad and jvp.grad_fn is None
    with fwAD.dual_level():  # the same JVP from a recorded dual forward
        duals = {name: fwAD.make_dual(leaf, tangent[name]) for name, leaf in leaves.items()}
        recorded = fwAD.unpack_dual(torch.func.functional_call(case.model, duals, (x,))).tangent
        assert recorded.requires_grad  # what the cached mode avoids
        torch.testing.assert_close(jvp, recorded.detach(), rtol=1e-14, atol=0.0)


def test_rebuilt_after_in_place_updates_and_mode_switches(make_case, rel_err):
    case = make_case("cnn_batchnorm_eval")
    model, data, loss = case.model, case.data, case.loss
    operator = GGNOperator(model, data, loss, cache_graph=True)
    vector = random_block(operator.shape[0], 1, seed=6)[:, 0]

    def assert_fresh() -> None:
        graphs = operator._graphs
        assert rel_err(operator @ vector, GGNOperator(model, data, loss) @ vector) <= TOL
        assert operator._graphs is not graphs  # rebuilt, not reused

    operator @ vector
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss(model, data[0]).backward()
    optimizer.step()  # in place, through the version counters
    assert_fresh()
    model[1].train()  # BatchNorm switches to batch statistics
    assert_fresh()
    with torch.no_grad():
        data[1][0].mul_(-1.5)  # a batch tensor of the list
    assert_fresh()


def test_failed_products_drop_the_cache_and_leave_the_model_unchanged(
    make_case, rel_err, monkeypatch
):
    case = make_case("mlp")
    model, data, loss = case.model, case.data, case.loss
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    operator = GGNOperator(model, data, loss, cache_graph=True)
    vector = random_block(operator.shape[0], 1, seed=7)[:, 0]
    expected = GGNOperator(model, data, loss) @ vector
    operator @ vector
    assert operator._graphs is not None

    def failing_vjp(*args, **kwargs):
        raise RuntimeError("boom in the backward pass")

    monkeypatch.setattr(autodiff_module, "vjp_columns", failing_vjp)
    with pytest.raises(RuntimeError, match="boom in the backward pass"):
        operator @ vector
    assert operator._graphs is None
    monkeypatch.undo()
    assert rel_err(operator @ vector, expected) <= TOL
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_cache_graph_must_be_a_bool(make_case):
    case = make_case("mlp")
    with pytest.raises(TypeError, match="cache_graph must be True or False"):
        GGNOperator(case.model, case.data, case.loss, cache_graph="yes")


def test_out_of_memory_in_the_recorded_dual_forward_falls_back(make_case, rel_err, monkeypatch):
    """The default product records the backward graph in its dual forward (tangent computations
    included); when that runs out of memory, the product retries with the graph-free JVP and a
    plain forward, warns once, and keeps that lighter path."""
    case = make_case("mlp")
    operator = GGNOperator(case.model, case.data, case.loss)
    reference = dense_ggn(case.model, case.data, case.loss)
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(autodiff_module, "forward_with_tangent", out_of_memory)
    vector = random_block(operator.shape[0], 1, seed=9)[:, 0]
    with pytest.warns(RuntimeWarning, match="out of memory in the dual-number forward"):
        assert rel_err(operator @ vector, reference @ vector) <= TOL
    assert not operator._sandwich.jvp.forward_mode.record_output_in_dual_forward
    assert rel_err(operator @ vector, reference @ vector) <= TOL
    assert len(calls) == 1  # not tried again


def test_other_errors_of_the_recorded_dual_forward_propagate(make_case, rel_err, monkeypatch):
    """Only out-of-memory switches to the graph-free JVP. Any other error of the dual forward
    propagates with ``jvp_method="forward"``; under ``"auto"`` it is what the forward-AD probe
    sees, so the exact double-backward JVP takes over (the error's text is not read)."""
    case = make_case("mlp")
    explicit = GGNOperator(case.model, case.data, case.loss, jvp_method="forward")
    automatic = GGNOperator(case.model, case.data, case.loss)
    vector = random_block(explicit.shape[0], 1, seed=10)[:, 0]
    expected = dense_ggn(case.model, case.data, case.loss) @ vector

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch inside the user's model")

    monkeypatch.setattr(autodiff_module, "forward_with_tangent", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        explicit @ vector
    assert explicit._sandwich.jvp.record_output_in_dual_forward
    assert rel_err(automatic @ vector, expected) <= TOL
    assert automatic.capabilities.forward_ad.supported is False
    assert "shape mismatch" in automatic.capabilities.forward_ad.reason
    assert automatic._sandwich.jvp.forward_mode.record_output_in_dual_forward
