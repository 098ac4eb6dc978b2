"""The drop-in KFACLinearOperator against curvlinops 3's itself (float64, 1e-10 relative):
every Fisher type on an MLP and a small CNN, KFAC-expand and -reduce, separate and joined bias,
MSE / cross-entropy / BCE, mean and sum; tensor-list products, to_scipy, the structure
properties and the state_dict round trip."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

DT = torch.float64
TOL = 1e-10


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 2, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def problem(architecture: str, loss_name: str, reduction: str) -> tuple[nn.Module, Any, list]:
    """A float64 model, its loss and two uneven batches of data."""
    torch.manual_seed(0)
    model = (mlp if architecture == "mlp" else cnn)().to(DT)
    generator = torch.Generator().manual_seed(1)
    shape = (7, 4) if architecture == "mlp" else (7, 2, 4, 4)
    x = torch.randn(*shape, generator=generator, dtype=DT)
    if loss_name == "mse":
        loss: nn.Module = nn.MSELoss(reduction=reduction)
        y = torch.randn(7, 3, generator=generator, dtype=DT)
    elif loss_name == "ce":
        loss = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, 3, (7,), generator=generator)
    else:
        loss = nn.BCEWithLogitsLoss(reduction=reduction)
        y = torch.randint(0, 2, (7, 3), generator=generator).to(DT)
    return model, loss, [(x[:3], y[:3]), (x[3:], y[3:])]


CASES = [
    # (fisher type, architecture, loss, reduction, kfac_approx, separate weight and bias)
    ("type-2", "mlp", "mse", "mean", "expand", True),
    ("type-2", "cnn", "ce", "sum", "reduce", False),
    ("mc", "mlp", "ce", "mean", "reduce", False),
    ("mc", "cnn", "bce", "mean", "expand", True),
    ("empirical", "mlp", "bce", "sum", "expand", False),
    ("empirical", "cnn", "mse", "mean", "reduce", True),
    ("forward-only", "mlp", "ce", "mean", "expand", True),
    ("forward-only", "cnn", "ce", "mean", "reduce", False),
]


def assert_close(mine: torch.Tensor, reference: torch.Tensor) -> None:
    scale = max(1.0, float(reference.abs().max()))
    assert float((mine - reference).abs().max()) <= TOL * scale


def build(case: tuple, module: Any, **extra: Any) -> tuple[Any, list[torch.Tensor]]:
    fisher, architecture, loss_name, reduction, approx, separate = case
    model, loss, data = problem(architecture, loss_name, reduction)
    params = [p for p in model.parameters()]
    kfac = module.KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type=fisher,
        mc_samples=3 if fisher == "mc" else 1,
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
        **extra,
    )
    return kfac, params


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_products_and_structure_equal_curvlinops(case: tuple) -> None:
    theirs, params = build(case, curvlinops)
    mine, _ = build(case, ours)
    columns = torch.randn(theirs.shape[1], 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert_close(mine @ columns, theirs @ columns)
    assert_close(mine @ columns[:, 0], theirs @ columns[:, 0])
    as_list = [
        c.reshape(*p.shape, 3) for c, p in zip(columns.split([p.numel() for p in params]), params)
    ]
    for a, b in zip(mine @ as_list, theirs @ as_list):
        assert_close(a, b)
    for name in ("trace", "logdet", "frobenius_norm"):
        torch.testing.assert_close(
            getattr(mine, name), getattr(theirs, name), rtol=1e-10, atol=0, equal_nan=True
        )
    array = columns.numpy()
    np.testing.assert_allclose(
        mine.to_scipy() @ array, theirs.to_scipy() @ array, rtol=1e-10, atol=1e-12
    )
    assert mine.dtype == DT and mine.to_scipy().dtype == np.float64


def test_det_equals_curvlinops_and_contract() -> None:
    case = ("type-2", "mlp", "mse", "sum", "expand", False)
    theirs, _ = build(case, curvlinops)
    mine, _ = build(case, ours)
    torch.testing.assert_close(mine.det, theirs.det, rtol=1e-9, atol=0)
    assert mine.adjoint() is mine and mine.device == theirs.device
    vector = torch.randn(mine.shape[1], dtype=DT, generator=torch.Generator().manual_seed(3))
    assert_close((mine + mine) @ vector, 2 * (theirs @ vector))
    assert_close((mine - 0.5 * mine) @ vector, 0.5 * (theirs @ vector))
    # composes with the other drop-in operators (the shared PyTorchLinearOperator algebra)
    assert isinstance(mine, ours.PyTorchLinearOperator)
    model, loss, data = problem("mlp", "mse", "sum")
    ggn = ours.GGNLinearOperator(model, loss, list(model.parameters()), data)
    assert_close((ggn - mine) @ vector, ggn @ vector - theirs @ vector)


def test_state_dict_round_trip_is_exact_and_matches_curvlinops_keys() -> None:
    case = ("mc", "cnn", "ce", "mean", "expand", False)
    mine, params = build(case, ours)
    theirs, _ = build(case, curvlinops)
    theirs.compute_kronecker_factors()
    state = mine.state_dict()
    assert set(state) == set(theirs.state_dict())
    model, _, data = problem("cnn", "ce", "mean")
    with pytest.warns(UserWarning, match="overwrite the parameters"):
        restored = ours.KFACLinearOperator.from_state_dict(
            state, model, list(model.parameters()), data, check_deterministic=False
        )
    for name, factor in mine._input_covariances.items():
        assert torch.equal(restored._input_covariances[name], factor)
    for name, factor in mine._gradient_covariances.items():
        assert torch.equal(restored._gradient_covariances[name], factor)
    columns = torch.randn(mine.shape[1], 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    assert torch.equal(restored @ columns, mine @ columns)


def test_refuses_what_curvlinops_refuses() -> None:
    model, _, data = problem("mlp", "mse", "mean")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="Invalid loss"):
        ours.KFACLinearOperator(model, nn.L1Loss(), params, data)
    with pytest.raises(ValueError, match="Invalid fisher_type"):
        ours.KFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="exact")
    assert "mc" in ours.FisherType and "bogus" not in ours.KFACType


# EKFAC's eigenbasis is unique only where the factors' eigenvalues are distinct: with 7 examples,
# KFAC-reduce gives the CNN's first layer a rank-7 input factor of size 19, whose null space
# eigh may return in any basis (curvlinops' and ours then differ by rounding). That case uses
# KFAC-expand here.
EKFAC_CASES = [
    case
    if case[0] != "forward-only" and case[1:5] != ("cnn", "ce", "sum", "reduce")
    else case[:4] + ("expand",) + case[5:]
    for case in CASES
    if case[0] != "forward-only"
]


def build_ekfac(case: tuple, module: Any) -> Any:
    fisher, architecture, loss_name, reduction, approx, separate = case
    model, loss, data = problem(architecture, loss_name, reduction)
    return module.EKFACLinearOperator(
        model,
        loss,
        list(model.parameters()),
        data,
        fisher_type=fisher,
        mc_samples=3 if fisher == "mc" else 1,
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )


@pytest.mark.parametrize("case", EKFAC_CASES, ids=["-".join(map(str, c)) for c in EKFAC_CASES])
def test_ekfac_and_its_inverse_equal_curvlinops(case: tuple) -> None:
    theirs, mine = build_ekfac(case, curvlinops), build_ekfac(case, ours)
    columns = torch.randn(theirs.shape[1], 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert_close(mine @ columns, theirs @ columns)
    for name in ("trace", "frobenius_norm"):
        torch.testing.assert_close(getattr(mine, name), getattr(theirs, name), rtol=1e-10, atol=0)
    inverse_theirs = curvlinops.KFACInverseLinearOperator(theirs, 1e-2, use_exact_damping=True)
    inverse_mine = ours.KFACInverseLinearOperator(mine, 1e-2, use_exact_damping=True)
    assert_close(inverse_mine @ columns, inverse_theirs @ columns)
    with pytest.raises(ValueError, match="Only exact damping"):
        ours.KFACInverseLinearOperator(mine, 1e-2)


DAMPINGS = [
    {"damping": 1e-2},
    {"damping": (1e-2, 1e-3)},
    {"damping": 1e-2, "use_heuristic_damping": True},
    {"damping": 1e-2, "use_exact_damping": True},
]


@pytest.mark.filterwarnings("ignore:Loading a state dict")
@pytest.mark.parametrize("options", DAMPINGS, ids=["plain", "tuple", "heuristic", "exact"])
@pytest.mark.parametrize("case", CASES[1:3], ids=["-".join(map(str, c)) for c in CASES[1:3]])
def test_kfac_inverse_equals_curvlinops(case: tuple, options: dict) -> None:
    theirs, _ = build(case, curvlinops)
    mine, _ = build(case, ours)
    inverse_theirs = curvlinops.KFACInverseLinearOperator(theirs, **options)
    inverse_mine = ours.KFACInverseLinearOperator(mine, **options)
    columns = torch.randn(theirs.shape[1], 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    assert_close(inverse_mine @ columns, inverse_theirs @ columns)
    restored = ours.KFACInverseLinearOperator.from_state_dict(inverse_mine.state_dict(), mine)
    assert torch.equal(restored @ columns, inverse_mine @ columns)
