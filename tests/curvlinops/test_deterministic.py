"""``check_deterministic`` follows curvlinops: setups curvlinops rejects (dropout in train mode,
shuffled data, shuffling with drop_last) raise a
RuntimeError naming the likely cause; deterministic setups pass."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

CURVATURE = ("HessianLinearOperator", "GGNLinearOperator", "EFLinearOperator")


def model_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)).double()


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    return TensorDataset(inputs, torch.randint(0, 2, (10,), generator=generator))


def loader(shuffle: bool, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    return DataLoader(
        dataset(), batch_size=4, shuffle=shuffle, drop_last=drop_last, generator=generator
    )


def build(library, name: str, model: nn.Module, data, **kwargs):
    params = list(model.parameters())
    if name.startswith(("Jacobian", "Transposed")):
        return getattr(library, name)(model, params, data, **kwargs)
    return getattr(library, name)(model, nn.CrossEntropyLoss(), params, data, **kwargs)


@pytest.mark.parametrize("name", CURVATURE)
def test_dropout_in_train_mode_is_rejected(name: str) -> None:
    model = model_with_dropout().train()
    data = list(loader(shuffle=False))
    with pytest.raises(RuntimeError):
        build(curvlinops, name, model, data)
    with pytest.raises(RuntimeError, match="dropout or BatchNorm in train mode"):
        build(ours, name, model, data)
    build(ours, name, model, data, check_deterministic=False)  # the user's explicit opt-out
    build(ours, name, model.eval(), data)  # eval mode is deterministic


@pytest.mark.parametrize("name", ["FisherMCLinearOperator", "JacobianLinearOperator"])
def test_shuffling_is_rejected_where_batch_order_matters(name: str) -> None:
    model = model_with_dropout().eval()
    with pytest.raises(RuntimeError):
        build(curvlinops, name, model, loader(shuffle=True))
    with pytest.raises(RuntimeError, match="shuffle=True"):
        build(ours, name, model, loader(shuffle=True))
    build(ours, name, model, loader(shuffle=False))


def test_shuffling_with_drop_last_is_rejected() -> None:
    model = model_with_dropout().eval()
    with pytest.raises(RuntimeError):
        build(curvlinops, "HessianLinearOperator", model, loader(shuffle=True, drop_last=True))
    build(ours, "HessianLinearOperator", model, loader(shuffle=False, drop_last=True))
    with pytest.raises(RuntimeError, match="drop_last"):
        build(ours, "HessianLinearOperator", model, loader(shuffle=True, drop_last=True))


@pytest.mark.parametrize("name", CURVATURE)
def test_shuffling_is_rejected(name: str) -> None:
    """curvlinops compares the last batch's loss of two passes, so it rejects shuffled data for
    every operator; so do we (every batch's loss)."""
    model = model_with_dropout().eval()
    with pytest.raises(RuntimeError):
        build(curvlinops, name, model, loader(shuffle=True))
    with pytest.raises(RuntimeError, match="shuffle=True"):
        build(ours, name, model, loader(shuffle=True))
    build(ours, name, model, loader(shuffle=False))


def test_one_shot_iterators_and_empty_data_are_rejected() -> None:
    model = model_with_dropout().eval()
    with pytest.raises(TypeError, match="one-shot iterator"):
        build(ours, "GGNLinearOperator", model, iter(list(loader(shuffle=False))))
    with pytest.raises(ValueError, match="no batches"):
        build(ours, "GGNLinearOperator", model, [])
