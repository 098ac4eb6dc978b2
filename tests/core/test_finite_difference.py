"""Finite-difference products within their documented tolerance, per dtype.

Documented (``hessian_product_finite_difference``): relative error ~1e-10 in float64, ~1e-5 in
float32, ~1e-2 in bf16/fp16. The reference is the exact float64 product of the *same* rounded
weights and inputs, so the measured error is the finite-difference error plus the low-precision
arithmetic of the model itself. Accepted here: 1e-7, 1e-3 and 0.1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import GGNOperator, HessianOperator, supervised_loss

TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}


def model_and_data(dtype: torch.dtype):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 8, generator=generator).to(dtype)
    labels = torch.randint(0, 3, (32,), generator=generator)
    exact_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    exact_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return model, [(inputs, labels)], exact_model, [(inputs.double(), labels)]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize(
    "operator_class, option", [(HessianOperator, "method"), (GGNOperator, "jvp_method")]
)
def test_finite_difference_within_documented_tolerance(dtype, operator_class, option, rel_err):
    model, data, exact_model, exact_data = model_and_data(dtype)
    loss = supervised_loss(F.cross_entropy)
    approximate = operator_class(model, data, loss, **{option: "finite_difference"})
    exact = operator_class(exact_model, exact_data, loss)
    generator = torch.Generator().manual_seed(2)
    columns = torch.randn(approximate.shape[0], 2, generator=generator, dtype=torch.float64)
    product = (approximate @ columns.to(dtype)).double()
    expected = exact @ columns.to(dtype).double()
    assert rel_err(product, expected) <= TOLERANCE[dtype]
    zero = approximate @ torch.zeros(approximate.shape[0], dtype=dtype)
    assert torch.count_nonzero(zero) == 0  # a zero direction: no step of size 1/0


def test_step_scales_with_the_direction_norm(rel_err):
    """A direction scaled by 1e6 gives a product scaled by 1e6 (the step is ||theta|| / ||v||)."""
    model, data, _, _ = model_and_data(torch.float64)
    operator = HessianOperator(
        model, data, supervised_loss(F.cross_entropy), method="finite_difference"
    )
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(operator.shape[0], generator=generator, dtype=torch.float64)
    small = operator @ direction
    assert rel_err(operator @ (1e6 * direction), 1e6 * small) <= 1e-8
    assert rel_err(operator @ (1e-6 * direction), 1e-6 * small) <= 1e-8


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-2)])
def test_one_sided_ggn_jvp_within_its_documented_tolerance(dtype, tolerance, rel_err):
    """``jvp_method="forward_difference"``: ~1e-3 relative error in float32 (documented)."""
    model, data, exact_model, exact_data = model_and_data(dtype)
    loss = supervised_loss(F.cross_entropy)
    approximate = GGNOperator(model, data, loss, jvp_method="forward_difference")
    central = GGNOperator(model, data, loss, jvp_method="finite_difference")
    exact = GGNOperator(exact_model, exact_data, loss)
    columns = torch.randn(approximate.shape[0], 2, generator=torch.Generator().manual_seed(3))
    expected = exact @ columns.double()
    one_sided_error = rel_err((approximate @ columns.to(dtype)).double(), expected)
    assert one_sided_error <= tolerance
    # central differences are the more accurate of the two
    assert rel_err((central @ columns.to(dtype)).double(), expected) < one_sided_error


@pytest.mark.parametrize("group_entries", [1 << 24, 7])
def test_entry_cap_equals_the_entrywise_minimum(monkeypatch, group_entries):
    """The multi-tensor cap (groups of any size, empty and all-zero tensors among them) equals
    ``min_i (|theta_i| + rms) / |v_i|`` computed entry by entry."""
    import torch_linop._finite_difference as fd

    monkeypatch.setattr(fd, "_GROUP_ENTRIES", group_entries)
    generator = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (0,), (5,), (2, 2, 2), (9,)]
    theta = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    direction = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    direction[2] = torch.zeros(5, dtype=torch.float64)  # no cap from a zero direction
    rms = 0.3
    flat_theta = torch.cat([t.flatten() for t in theta])
    flat_direction = torch.cat([d.flatten() for d in direction])
    nonzero = flat_direction != 0
    expected = float(((flat_theta.abs() + rms)[nonzero] / flat_direction.abs()[nonzero]).min())
    assert fd.entry_cap(theta, direction, rms) == pytest.approx(expected, rel=1e-14)
    zeros = [torch.zeros_like(d) for d in direction]
    assert fd.entry_cap(theta, zeros, rms) == float("inf")
    assert fd.entry_cap([], [], rms) == float("inf")
