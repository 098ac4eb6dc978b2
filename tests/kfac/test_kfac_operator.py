"""KFACOperator against exact curvature where theory says KFAC is exact, and its conventions.

Dense truths come from ``torch_linop.reference`` (``torch.func`` Jacobians and loss Hessians),
which shares no code with the Kronecker factors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import supervised_loss
from torch_linop.kfac import KFACOperator
from torch_linop.reference import dense_ggn

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def deep_linear(seed: int, sizes: tuple[int, ...] = (3, 4, 2, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    return nn.Sequential(*layers).to(DT)


def diagonal_blocks(matrix: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    blocks, start = [], 0
    for size in sizes:
        blocks.append(matrix[start : start + size, start : start + size])
        start += size
    return blocks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_one_datum_equals_exact_ggn_blocks(reduction: str) -> None:
    """Deep linear network, MSE, one datum, type-2: KFAC with joined [W | b] is exactly the
    GGN's per-layer block; with separate weight and bias, the weight and bias blocks."""
    model = deep_linear(0)
    x = torch.randn(1, 3, generator=gen(1), dtype=DT)
    y = torch.randn(1, 3, generator=gen(2), dtype=DT)
    data = [(x, y)]
    exact = dense_ggn(model, data, supervised_loss(nn.MSELoss(reduction=reduction)))
    sizes = [p.numel() for p in model.parameters()]
    layer_sizes = [sizes[i] + sizes[i + 1] for i in range(0, len(sizes), 2)]

    joined = KFACOperator(
        model, data, nn.MSELoss(reduction=reduction), separate_weight_and_bias=False
    )
    for ours, truth in zip(
        diagonal_blocks(joined.to_dense(), layer_sizes), diagonal_blocks(exact, layer_sizes)
    ):
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)

    separate = KFACOperator(model, data, nn.MSELoss(reduction=reduction))
    dense = separate.to_dense()
    for ours, truth in zip(diagonal_blocks(dense, sizes), diagonal_blocks(exact, sizes)):
        torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)
    # and nothing outside the per-parameter blocks
    mask = torch.block_diag(*[torch.ones(s, s, dtype=DT) for s in sizes])
    assert float((dense * (1 - mask)).abs().max()) == 0.0


class SharedThenPooled(nn.Module):
    """Two weight-shared linear layers over S positions, mean-pooled, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared1 = nn.Linear(3, 4)
        self.shared2 = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared2(self.shared1(x)).mean(1))


def test_kfac_reduce_exact_for_weight_sharing_then_pooling() -> None:
    """Eschenhagen et al. (2023): for a linear network whose weight-shared layers feed a mean
    over the shared positions, with MSE on one datum, KFAC-reduce is exact (the per-example
    gradient is g abar^T); KFAC-expand is not."""
    torch.manual_seed(3)
    model = SharedThenPooled().to(DT)
    x = torch.randn(1, 5, 3, generator=gen(4), dtype=DT)
    y = torch.randn(1, 2, generator=gen(5), dtype=DT)
    data = [(x, y)]
    exact = dense_ggn(model, data, supervised_loss(F.mse_loss))
    sizes = [p.numel() for p in model.parameters()]
    layer_sizes = [sizes[i] + sizes[i + 1] for i in range(0, len(sizes), 2)]
    truth = diagonal_blocks(exact, layer_sizes)

    reduce = KFACOperator(
        model, data, nn.MSELoss(), kfac_approx="reduce", separate_weight_and_bias=False
    )
    for ours, block in zip(diagonal_blocks(reduce.to_dense(), layer_sizes), truth):
        torch.testing.assert_close(ours, block, rtol=1e-12, atol=1e-12)

    expand = KFACOperator(
        model, data, nn.MSELoss(), kfac_approx="expand", separate_weight_and_bias=False
    )
    shared_block = diagonal_blocks(expand.to_dense(), layer_sizes)[0]
    assert float((shared_block - truth[0]).abs().max()) > 1e-3


def test_mc_converges_to_type2() -> None:
    """MC factors are unbiased for the type-2 ones: the error shrinks as mc_samples grows
    (fixed seeds). The data are 8 rows repeated 50 times (the type-2 KFAC of a repeated data
    set is the same), so each backward pass averages 25 draws per row."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(8, 3, generator=gen(7), dtype=DT)
    y = torch.randint(0, 3, (8,), generator=gen(8))
    type2 = KFACOperator(model, [(x, y)], nn.CrossEntropyLoss()).to_dense()
    repeated = [(x.repeat(25, 1), y.repeat(25))]
    torch.testing.assert_close(
        KFACOperator(model, repeated, nn.CrossEntropyLoss()).to_dense(), type2
    )

    def error(samples: int) -> float:
        mc = KFACOperator(
            model, repeated, nn.CrossEntropyLoss(), fisher_type="mc", mc_samples=samples, seed=9
        ).to_dense()
        return float(torch.linalg.norm(mc - type2) / torch.linalg.norm(type2))

    one, many = error(1), error(100)
    assert many < 0.015
    assert many < one / 3


def test_batches_weighted_like_the_exact_operators() -> None:
    """Splitting the data into uneven batches changes nothing (mean reduction)."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(7, 3, generator=gen(11), dtype=DT)
    y = torch.randn(7, 2, generator=gen(12), dtype=DT)
    for fisher in ("type-2", "empirical"):
        whole = KFACOperator(model, [(x, y)], F.mse_loss, fisher_type=fisher).to_dense()
        split = KFACOperator(
            model, [(x[:2], y[:2]), (x[2:], y[2:])], F.mse_loss, fisher_type=fisher
        ).to_dense()
        torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)


def test_ignore_index_rows_carry_no_gradient_weight() -> None:
    """A target equal to ignore_index contributes nothing to the gradient factors: they equal
    those of the data without that sample (each valid row weighs 1 / #valid rows)."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(5, 3, generator=gen(14), dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen(15))
    masked = y.clone()
    masked[2] = -100
    for fisher in ("type-2", "empirical", "mc"):
        with_ignored = KFACOperator(model, [(x, masked)], F.cross_entropy, fisher_type=fisher)
        keep = torch.tensor([0, 1, 3, 4])
        without = KFACOperator(model, [(x[keep], y[keep])], F.cross_entropy, fisher_type=fisher)
        with_ignored.compute_factors()
        without.compute_factors()
        if fisher == "mc":  # different draws: only check the ignored row adds nothing
            continue
        for name, factor in without.gradient_covariances.items():
            torch.testing.assert_close(with_ignored.gradient_covariances[name], factor)


class SequenceModel(nn.Module):
    """Token-wise MLP on (batch, seq, features), logits (batch, seq, C) or (batch, C, seq)."""

    def __init__(self, classes_last: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
        self.classes_last = classes_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        return logits if self.classes_last else logits.transpose(1, 2)


@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
def test_sequence_logits_class_last_equals_class_axis_one(fisher: str) -> None:
    torch.manual_seed(16)
    last = SequenceModel(classes_last=True).to(DT)
    first = SequenceModel(classes_last=False).to(DT)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 4, 3, generator=gen(17), dtype=DT)
    y = torch.randint(0, 5, (2, 4), generator=gen(18))
    y[0, 1] = -100
    data = [(x, y)]
    ours = KFACOperator(last, data, nn.CrossEntropyLoss(), class_dim=-1, fisher_type=fisher)
    torch_layout = KFACOperator(first, data, nn.CrossEntropyLoss(), fisher_type=fisher)
    torch.testing.assert_close(ours.to_dense(), torch_layout.to_dense())


def test_forward_only_gradient_factor_is_identity_and_bce_runs() -> None:
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(6, 3, generator=gen(20), dtype=DT)
    y = torch.randint(0, 2, (6, 2), generator=gen(21)).to(DT)
    kfac = KFACOperator(model, [(x, y)], nn.BCEWithLogitsLoss(), fisher_type="forward-only")
    kfac.compute_factors()
    for layer in kfac.layers:
        torch.testing.assert_close(
            kfac.gradient_covariances[layer.name], torch.eye(layer.out_features, dtype=DT)
        )
    inputs = x
    torch.testing.assert_close(kfac.input_covariances["0"], inputs.T @ inputs / 6)


def test_model_untouched_and_hooks_removed_even_on_error() -> None:
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, generator=gen(23), dtype=DT)
    good, bad = (x, torch.randn(4, 2, dtype=DT)), (x, torch.randn(4, 3, dtype=DT))
    kfac = KFACOperator(model, [good, bad], nn.MSELoss(), params=list(model.parameters()))
    with pytest.raises(ValueError, match="compares them elementwise"):
        kfac.compute_factors()
    assert all(not m._forward_hooks for m in model.modules())
    assert model[0].weight.requires_grad is False and model[2].weight.requires_grad is True
    assert model.training
    kfac_ok = KFACOperator(model, [good], nn.MSELoss(), params=list(model.parameters()))
    kfac_ok.compute_factors()
    assert all(not m._forward_hooks for m in model.modules())
    assert model[0].weight.requires_grad is False
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_unsupported_layer_refused_by_name_or_skipped() -> None:
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))]
    with pytest.raises(ValueError, match=r"'1.weight' belongs to LayerNorm '1'.*skip_unsupported"):
        KFACOperator(model, data, nn.MSELoss())
    kfac = KFACOperator(model, data, nn.MSELoss(), skip_unsupported=True)
    assert kfac.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert kfac.shape == (3 * 4 + 4 + 4 * 2 + 2,) * 2


def test_bad_arguments_say_what_to_do() -> None:
    model = deep_linear(25)
    data = [(torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT))]
    with pytest.raises(ValueError, match="use one of"):
        KFACOperator(model, data, nn.MSELoss(), fisher_type="exact")
    with pytest.raises(ValueError, match="only applies to fisher_type='mc'"):
        KFACOperator(model, data, nn.MSELoss(), mc_samples=3)
    with pytest.raises(ValueError, match="MSE, cross-entropy or BCE"):
        KFACOperator(model, data, nn.L1Loss())


def test_hf_conv1d_equals_linear_with_the_transposed_weight() -> None:
    """GPT-2's Conv1D stores W^T: KFAC of a Conv1D model is that of the nn.Linear model with the
    transposed weight, with weight entries permuted accordingly (also joined and for EKFAC)."""
    conv1d_module = pytest.importorskip("transformers.pytorch_utils")
    from torch_linop.kfac import EKFACOperator

    torch.manual_seed(26)
    linear = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    conv = nn.Sequential(conv1d_module.Conv1D(4, 3), nn.Tanh(), conv1d_module.Conv1D(2, 4)).to(DT)
    with torch.no_grad():
        for source, target in ((linear[0], conv[0]), (linear[2], conv[2])):
            target.weight.copy_(source.weight.T)
            target.bias.copy_(source.bias)
    x = torch.randn(2, 5, 3, generator=gen(27), dtype=DT)
    y = torch.randint(0, 2, (2, 5), generator=gen(28))
    data = [(x, y)]
    # parameter-vector permutation: conv entry (i, o) of W^T <- linear entry (o, i)
    order, start = [], 0
    for layer in (linear[0], linear[2]):
        out_features, in_features = layer.weight.shape
        grid = torch.arange(out_features * in_features).reshape(out_features, in_features)
        order += (grid.T.reshape(-1) + start).tolist()
        start += out_features * in_features
        order += list(range(start, start + out_features))
        start += out_features
    cases = ((KFACOperator, True, "type-2"), (KFACOperator, False, "type-2"))
    cases += ((EKFACOperator, False, "mc"),)  # EKFAC type-2 needs one loss row per example
    for operator_class, separate, fisher in cases:
        options = {"class_dim": -1, "separate_weight_and_bias": separate, "fisher_type": fisher}
        ours = operator_class(conv, data, nn.CrossEntropyLoss(), **options).to_dense()
        reference = operator_class(linear, data, nn.CrossEntropyLoss(), **options).to_dense()
        torch.testing.assert_close(ours, reference[order][:, order], rtol=1e-12, atol=1e-14)
