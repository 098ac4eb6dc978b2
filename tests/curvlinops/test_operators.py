"""The drop-in's exact operators against curvlinops itself (float64, 1e-10): Hessian, GGN and
empirical Fisher on mean and sum reductions, uneven batches, dict inputs, 3-d outputs, a CNN,
block-diagonal Hessians, parameter subsets, and parameters given as a dict."""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

TOL = 1e-10
EXACT = ("HessianLinearOperator", "GGNLinearOperator", "EFLinearOperator")


def dense(operator: Any) -> torch.Tensor:
    """The operator's matrix from its torch path (identity columns)."""
    return operator @ torch.eye(operator.shape[1], dtype=torch.float64)


def probes(operator: Any, num_columns: int = 6) -> torch.Tensor:
    """The operator times fixed random columns (cheaper than the dense matrix for the CNN)."""
    generator = torch.Generator().manual_seed(123)
    columns = torch.randn(operator.shape[1], num_columns, generator=generator, dtype=torch.float64)
    return operator @ columns


def assert_close(ours_matrix: torch.Tensor, reference: torch.Tensor) -> None:
    scale = max(1.0, float(reference.abs().max()))
    assert float((ours_matrix - reference).abs().max()) <= TOL * scale


def split(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tensor, sizes))


def batches(inputs: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> list[tuple]:
    return list(zip(split(inputs, sizes), split(targets, sizes)))


def mlp(out_features: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out_features)).double()


class ChannelsSecond(nn.Module):
    """Sequence model with output (N, C, S), the layout cross-entropy expects for sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(inputs)).transpose(1, 2)


class DictInput(nn.Module):
    """A model fed dict-like inputs (curvlinops leaves them to the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(2)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(inputs["x"]) * inputs["scale"]


def case_mlp(reduction: str, criterion: str) -> tuple[nn.Module, nn.Module, list]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    if criterion == "mse":
        targets = torch.randn(8, 2, generator=generator, dtype=torch.float64)
        loss = nn.MSELoss(reduction=reduction)
    elif criterion == "ce":
        targets = torch.randint(0, 2, (8,), generator=generator)
        loss = nn.CrossEntropyLoss(reduction=reduction)
    else:
        targets = torch.randint(0, 2, (8, 2), generator=generator).double()
        loss = nn.BCEWithLogitsLoss(reduction=reduction)
    return mlp(2), loss, batches(inputs, targets, [3, 4, 1])  # uneven batches


def case_sequence(reduction: str, criterion: str) -> tuple[nn.Module, nn.Module, list]:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64)
    if criterion == "mse":
        targets = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64)
        return mlp(3), nn.MSELoss(reduction=reduction), batches(inputs, targets, [2, 3])
    torch.manual_seed(3)
    targets = torch.randint(0, 3, (5, 4), generator=generator)
    model = ChannelsSecond().double()
    return model, nn.CrossEntropyLoss(reduction=reduction), batches(inputs, targets, [2, 3])


def case_cnn(reduction: str) -> tuple[nn.Module, nn.Module, list]:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).double()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(6, 1, 5, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (6,), generator=generator)
    return model, nn.CrossEntropyLoss(reduction=reduction), batches(inputs, targets, [4, 2])


CASES: dict[str, Callable[[], tuple[nn.Module, nn.Module, list]]] = {
    f"{name}-{reduction}": (lambda f=factory, r=reduction: f(r))
    for reduction in ("mean", "sum")
    for name, factory in {
        "mlp-mse": lambda r: case_mlp(r, "mse"),
        "mlp-ce": lambda r: case_mlp(r, "ce"),
        "mlp-bce": lambda r: case_mlp(r, "bce"),
        "seq-mse": lambda r: case_sequence(r, "mse"),
        "seq-ce": lambda r: case_sequence(r, "ce"),
        "cnn-ce": case_cnn,
    }.items()
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", EXACT)
def test_matches_curvlinops(case: str, name: str) -> None:
    model, loss, data = CASES[case]()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = getattr(curvlinops, name)(model, loss, params, data)
    operator = getattr(ours, name)(model, loss, params, data)
    assert operator.shape == reference.shape
    assert_close(probes(operator), probes(reference))


@pytest.mark.parametrize("name", EXACT)
def test_dict_inputs_with_batch_size_fn(name: str) -> None:
    model = DictInput()
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(7, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(7, 2, generator=generator, dtype=torch.float64)
    data = [({"x": x, "scale": 2.0}, y) for x, y in batches(inputs, targets, [4, 3])]

    def batch_size_fn(inputs: dict) -> int:
        return inputs["x"].shape[0]

    params = list(model.parameters())
    args = (model, nn.MSELoss(), params, data)
    reference = getattr(curvlinops, name)(*args, batch_size_fn=batch_size_fn)
    operator = getattr(ours, name)(*args, batch_size_fn=batch_size_fn)
    assert_close(dense(operator), dense(reference))
    with pytest.raises(ValueError, match="batch_size_fn"):
        getattr(ours, name)(*args)


def test_block_diagonal_hessian() -> None:
    model, loss, data = case_mlp("mean", "ce")
    params = list(model.parameters())
    reference = curvlinops.HessianLinearOperator(model, loss, params, data, block_sizes=[2, 1, 1])
    operator = ours.HessianLinearOperator(model, loss, params, data, block_sizes=[2, 1, 1])
    blocks = dense(operator)
    assert_close(blocks, dense(reference))
    full = dense(ours.HessianLinearOperator(model, loss, params, data))
    first = sum(p.numel() for p in params[:2])
    assert float(blocks[:first, first:].abs().max()) == 0.0  # off-diagonal blocks vanish
    assert_close(blocks[:first, :first], full[:first, :first])
    with pytest.raises(ValueError, match="Sum of blocks"):
        ours.HessianLinearOperator(model, loss, params, data, block_sizes=[2, 1])


@pytest.mark.parametrize("name", EXACT)
def test_parameter_subset_in_given_order(name: str) -> None:
    model, loss, data = case_mlp("mean", "ce")
    weight_1, _, weight_2, bias_2 = model.parameters()
    params = [bias_2, weight_1, weight_2]  # a subset, not in the model's order
    reference = getattr(curvlinops, name)(model, loss, params, data)
    operator = getattr(ours, name)(model, loss, params, data)
    assert_close(dense(operator), dense(reference))


@pytest.mark.parametrize("name", EXACT)
def test_params_as_dict_evaluates_at_those_values(name: str) -> None:
    model, loss, data = case_mlp("mean", "mse")
    generator = torch.Generator().manual_seed(7)
    values = {
        n: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for n, p in model.named_parameters()
        if n != "0.bias"
    }
    moved = copy.deepcopy(model)  # the same model with its parameters set to `values`
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in values:
                p.copy_(values[n])
    reference_params = [p for n, p in moved.named_parameters() if n in values]
    reference = getattr(curvlinops, name)(moved, loss, reference_params, data)
    operator = getattr(ours, name)(model, loss, values, data)
    assert_close(dense(operator), dense(reference))
    assert all(not torch.equal(model.get_parameter(n), v) for n, v in values.items())  # untouched
    gradient, value = operator.gradient_and_loss()
    reference_gradient, reference_value = reference.gradient_and_loss()
    assert isinstance(gradient, dict) and list(gradient) == list(values)
    assert abs(float(value - reference_value)) <= TOL
    for ours_g, ref_g in zip(gradient.values(), reference_gradient):
        assert_close(ours_g, ref_g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_and_loss(reduction: str) -> None:
    model, loss, data = case_sequence(reduction, "ce")
    params = list(model.parameters())
    gradient, value = ours.GGNLinearOperator(model, loss, params, data).gradient_and_loss()
    reference_gradient, reference_value = curvlinops.GGNLinearOperator(
        model, loss, params, data
    ).gradient_and_loss()
    assert abs(float(value - reference_value)) <= TOL * max(1.0, abs(float(reference_value)))
    for ours_g, ref_g in zip(gradient, reference_gradient):
        assert_close(ours_g, ref_g)


def test_scipy_and_torch_protocol() -> None:
    """curvlinops 3's faces: torch dtype and device, scipy only through ``to_scipy()``."""
    model, loss, data = case_mlp("mean", "ce")
    params = list(model.parameters())
    operator = ours.GGNLinearOperator(model, loss, params, data)
    matrix = dense(operator).numpy()
    n = operator.shape[0]
    vector = np.random.default_rng(0).standard_normal(n)

    assert operator.dtype == torch.float64 and operator.device == torch.device("cpu")
    as_scipy = operator.to_scipy()
    assert as_scipy.dtype == np.float64
    np.testing.assert_allclose(as_scipy @ vector, matrix @ vector, atol=TOL)
    np.testing.assert_allclose(as_scipy.rmatvec(vector), matrix.T @ vector, atol=TOL)
    single = as_scipy @ vector.astype(np.float32)
    assert isinstance(single, np.ndarray) and single.dtype == np.float32
    assert operator.adjoint() is operator
    np.testing.assert_allclose(as_scipy.matmat(np.eye(n)[:, :3]), matrix[:, :3], atol=TOL)

    shifted = as_scipy + 2.0 * aslinearoperator(np.eye(n))
    np.testing.assert_allclose(shifted @ vector, matrix @ vector + 2.0 * vector, atol=TOL)
    assert operator.to_scipy(np.float32).dtype == np.float32
    with pytest.raises(ValueError, match="to_scipy"):
        operator @ vector  # ndarrays: curvlinops 3 multiplies tensors only

    as_list = [
        torch.as_tensor(t) for t in np.split(vector, np.cumsum([p.numel() for p in params])[:-1])
    ]
    as_list = [t.reshape(p.shape) for t, p in zip(as_list, params)]
    product = operator @ as_list
    assert [t.shape for t in product] == [p.shape for p in params]
    np.testing.assert_allclose(torch.cat([t.flatten() for t in product]), matrix @ vector, atol=TOL)
    columns = [torch.stack([t, 2 * t], dim=-1) for t in as_list]  # trailing column axis
    product = operator @ columns
    assert [t.shape for t in product] == [(*p.shape, 2) for p in params]
    np.testing.assert_allclose(
        torch.cat([t.reshape(-1, 2) for t in product])[:, 1], 2 * matrix @ vector, atol=TOL
    )
    with pytest.raises(ValueError, match="trailing dimension"):
        operator @ [t.flatten() for t in as_list]


def test_rejects_bad_arguments() -> None:
    model, loss, data = case_mlp("mean", "mse")
    with pytest.raises(ValueError, match="not a parameter"):
        ours.HessianLinearOperator(model, loss, [torch.zeros(3, dtype=torch.float64)], data)
    with pytest.raises(ValueError, match="not a parameter name"):
        ours.HessianLinearOperator(model, loss, {"nope": torch.zeros(3)}, data)
    with pytest.raises(ValueError, match="reduction"):
        ours.GGNLinearOperator(model, nn.MSELoss(reduction="none"), list(model.parameters()), data)
    with pytest.raises(NotImplementedError, match="EFLinearOperator"):
        ours.EFLinearOperator(model, nn.L1Loss(), list(model.parameters()), data)
    with pytest.raises(TypeError, match="nn.Module"):
        ours.HessianLinearOperator(lambda x: x, loss, list(model.parameters()), data)


CRITERION_OPTIONS = {
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=-100),
    "label_smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100),
    "class_weights": lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]).double()),
    "class_weights_sum": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5]).double(), reduction="sum"
    ),
    "bce_pos_weight_soft_targets": lambda: nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor([1.0, 2.0, 3.0]).double()
    ),
}


@pytest.mark.parametrize("option", sorted(CRITERION_OPTIONS))
@pytest.mark.parametrize("name", EXACT)
def test_criterion_options(option: str, name: str) -> None:
    """Ignored labels, label smoothing, class weights and pos_weight keep curvlinops' factors."""
    loss = CRITERION_OPTIONS[option]()
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        targets = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    else:
        targets = torch.randint(0, 3, (9,), generator=generator)
        targets[[1, 4]] = -100 if option in ("ignore_index", "label_smoothing") else targets[[1, 4]]
    model, data = mlp(3), batches(inputs, targets, [4, 5])
    params = list(model.parameters())
    reference = getattr(curvlinops, name)(model, loss, params, data)
    operator = getattr(ours, name)(model, loss, params, data)
    assert_close(dense(operator), dense(reference))
