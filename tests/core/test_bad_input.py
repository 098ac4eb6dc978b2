"""Bad input gets a clear error where it enters: each test asserts the type and the message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    match_names,
    supervised_loss,
)
from torch_linop.reference import dense_hessian

DTYPE = torch.float64


@pytest.fixture
def mlp(make_case):
    case = make_case("mlp")
    return case, HessianOperator(case.model, case.data, case.loss)


def test_wrong_vector_length(mlp):
    _, operator = mlp
    size = operator.shape[0]
    with pytest.raises(
        ValueError, match=rf"expected a vector of shape \({size},\).*got shape \(7,\)"
    ):
        operator @ torch.zeros(7, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"got shape \(3, 2, 1\)"):
        operator @ torch.zeros(3, 2, 1, dtype=DTYPE)
    with pytest.raises(ValueError, match="matvec expects a vector"):
        operator.matvec(torch.zeros(size, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="matmat expects a 2-d"):
        operator.matmat(torch.zeros(size, dtype=DTYPE))
    # numpy path: scipy's own check says only "dimension mismatch"; ours names the size
    for call, array in (
        (operator.matvec, np.zeros(size + 1)),
        (operator.__matmul__, np.zeros(size - 1)),
        (operator.dot, np.zeros((size + 2, 3))),
        (operator.matmat, np.zeros((size + 2, 3))),
    ):
        with pytest.raises(ValueError, match=rf"of shape \({size}, {size}\) multiplies") as raised:
            call(array)
        message = str(raised.value)
        assert f"({size},)" in message or f"({size}, k)" in message, message
        assert f"got shape {array.shape}" in message


@pytest.mark.parametrize("cache_graph", [False, True])
def test_float32_data_into_a_float64_model(make_case, cache_graph):
    case = make_case("mlp")
    data = [(x.float(), y) for x, y in case.data]
    operator = GGNOperator(case.model, data, case.loss, cache_graph=cache_graph)
    with pytest.raises(
        TypeError, match="holding torch.float32 tensors while the model's"
    ) as raised:
        operator @ torch.ones(operator.shape[0], dtype=DTYPE)
    assert "x.to(torch.float64)" in str(raised.value)
    assert operator._last_batch is None  # the failing batch is not kept alive


def test_torch_vector_of_wrong_dtype_or_device(mlp):
    _, operator = mlp
    size = operator.shape[0]
    with pytest.raises(
        TypeError, match=r"torch.float32 does not match the parameters' torch.float64"
    ):
        operator @ torch.zeros(size, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"tensor is on meta, the model on cpu.*t.to\(H.device\)"):
        operator @ torch.zeros(size, dtype=DTYPE, device="meta")


def test_non_finite_vector(mlp):
    _, operator = mlp
    vector = torch.zeros(operator.shape[0], dtype=DTYPE)
    vector[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        operator @ vector
    with pytest.raises(ValueError, match="NaN or Inf"):
        operator.matvec(np.full(operator.shape[0], np.inf))
    with pytest.raises(TypeError, match="complex vectors are not supported"):
        operator.matvec(np.zeros(operator.shape[0], dtype=np.complex128))


def test_empty_data_generators_and_single_tensors(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(case.model, [], case.loss)
    with pytest.raises(TypeError, match=r"one-shot iterator or generator.*list\(data\)"):
        HessianOperator(case.model, (batch for batch in case.data), case.loss)
    with pytest.raises(TypeError, match="got a single tensor"):
        HessianOperator(case.model, case.data[0][0], case.loss)

    class EmptyIterable:  # a re-iterable without len(): found empty at the first pass
        def __iter__(self):
            return iter(())

    operator = HessianOperator(case.model, EmptyIterable(), case.loss)
    with pytest.raises(ValueError, match="data yielded no batches"):
        operator @ torch.zeros(operator.shape[0], dtype=DTYPE)


def test_non_scalar_and_non_finite_losses(make_case):
    case = make_case("mlp")
    size = sum(p.numel() for p in case.model.parameters())
    vector = torch.ones(size, dtype=DTYPE)

    def per_sample(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    for method in ("autograd", "forward", "finite_difference"):
        operator = HessianOperator(case.model, case.data, per_sample, method=method)
        with pytest.raises(ValueError, match=r"must return a scalar loss, got shape \(5,\)"):
            operator @ vector

    def infinite(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1]) * float("inf")

    for method in ("autograd", "finite_difference"):
        operator = HessianOperator(case.model, case.data, infinite, method=method)
        with pytest.raises(ValueError, match=r"non-finite loss \(inf\)"):
            operator @ vector
    # forward-over-reverse cannot look at the value inside vmap: the product is checked instead
    bad_data = [(torch.full_like(x, float("nan")), y) for x, y in case.data]
    for operator in (
        HessianOperator(case.model, bad_data, case.loss, method="forward"),
        GGNOperator(case.model, bad_data, case.loss),
        EmpiricalFisherOperator(case.model, bad_data, case.loss),
        MCFisherOperator(case.model, bad_data, case.loss),
    ):
        with pytest.raises(ValueError, match="product is not finite"):
            operator @ vector

    def not_a_tensor(model, batch):
        return 1.0

    with pytest.raises(TypeError, match="must return a torch.Tensor, got float"):
        HessianOperator(case.model, case.data, not_a_tensor) @ vector


def test_parameter_selection_errors(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError, match=r"no parameter selected.*'0.weight'"):
        HessianOperator(case.model, case.data, case.loss, param_filter=match_names("missing.*"))
    with pytest.raises(ValueError, match="the model has no parameters"):
        HessianOperator(nn.Tanh(), case.data, case.loss)
    with pytest.raises(ValueError, match="match_names\\(\\) needs at least one glob pattern"):
        match_names()
    mixed = nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3).float())
    with pytest.raises(ValueError, match=r"several dtypes \['torch.float32', 'torch.float64'\]"):
        HessianOperator(mixed, case.data, case.loss)
    split = nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3, device="meta").double())
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        HessianOperator(split, case.data, case.loss)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        HessianOperator(lambda x: x, case.data, case.loss)


def test_loss_not_depending_on_a_parameter_gives_a_zero_block(make_case, dense, rel_err):
    class WithUnused(nn.Module):
        def __init__(self, used):
            super().__init__()
            self.used = used
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    case = make_case("mlp")
    model = WithUnused(case.model).to(DTYPE)
    reference = dense_hessian(case.model, case.data, case.loss)
    used = reference.shape[0]
    operators = [
        HessianOperator(model, case.data, case.loss, method=method)
        for method in ("autograd", "forward", "finite_difference")
    ] + [
        GGNOperator(model, case.data, case.loss, jvp_method=jvp)
        for jvp in ("auto", "double_backward", "finite_difference")
    ]
    operators += [EmpiricalFisherOperator(model, case.data, case.loss)]
    operators += [MCFisherOperator(model, case.data, case.loss)]
    for operator in operators:
        matrix = dense(operator)
        assert matrix.shape == (used + 6, used + 6)
        assert (
            torch.count_nonzero(matrix[used:]) == 0 and torch.count_nonzero(matrix[:, used:]) == 0
        )
        assert torch.count_nonzero(matrix[:used, :used]) > 0
    exact = dense(operators[0])[:used, :used]
    assert rel_err(exact, reference) <= 1e-12
    only_unused = HessianOperator(model, case.data, case.loss, param_filter=match_names("unused.*"))
    assert torch.count_nonzero(dense(only_unused)) == 0


def test_dropout_in_train_mode_is_detected(make_case):
    case = make_case("mlp")
    model = nn.Sequential(case.model[0], nn.Dropout(0.5), *case.model[1:]).train()
    for operator_class in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        with pytest.raises(RuntimeError, match=r"not deterministic.*model\.eval\(\)"):
            operator_class(model, case.data, case.loss, check_deterministic=True)
    model.eval()
    HessianOperator(model, case.data, case.loss, check_deterministic=True)  # now fine


def test_wrong_options_and_loss_objects(make_case):
    case = make_case("mlp")
    with pytest.raises(ValueError, match="method must be one of"):
        HessianOperator(case.model, case.data, case.loss, method="exact")
    with pytest.raises(ValueError, match="jvp_method must be one of"):
        GGNOperator(case.model, case.data, case.loss, jvp_method="reverse")
    with pytest.raises(TypeError, match=r"supervised_loss\(nn.CrossEntropyLoss\(\)\)"):
        HessianOperator(case.model, case.data, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="GGNOperator needs a loss that separates"):
        GGNOperator(case.model, case.data, lambda model, batch: model(batch[0]).sum())
    with pytest.raises(ValueError, match="reduction='none' is not supported"):
        supervised_loss(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        HessianOperator(case.model, case.data, case.loss, num_data=0)
    with pytest.raises(ValueError, match="supervised_loss expects \\(inputs, targets\\) batches"):
        op = HessianOperator(case.model, [case.data[0][0]], case.loss)
        op @ torch.zeros(op.shape[0], dtype=DTYPE)


def test_forward_method_names_the_pytorch_mse_bug(make_case):
    """``F.mse_loss(reduction="mean")`` breaks torch.func forward-over-reverse (PyTorch #123996):
    supervised_loss avoids it; a hand-written loss gets an error that names the fix."""
    case = make_case("mlp")
    generator = torch.Generator().manual_seed(0)
    data = [(x, torch.randn(x.shape[0], 3, generator=generator, dtype=DTYPE)) for x, _ in case.data]

    def plain_mse(model, batch):
        return F.mse_loss(model(batch[0]), batch[1])

    vector = torch.ones(sum(p.numel() for p in case.model.parameters()), dtype=DTYPE)
    operator = HessianOperator(case.model, data, plain_mse, method="forward")
    try:
        operator @ vector
    except RuntimeError as error:  # PyTorch with the bug: the message names the fix
        assert "method='autograd'" in str(error)
    supervised = HessianOperator(case.model, data, supervised_loss(F.mse_loss), method="forward")
    reference = HessianOperator(case.model, data, plain_mse) @ vector
    torch.testing.assert_close(supervised @ vector, reference, rtol=1e-12, atol=1e-14)
