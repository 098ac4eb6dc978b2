"""Non-determinism that changes the matrix between products is reported once, when the operator
is built (train-mode dropout; a shuffled DataLoader with train-mode BatchNorm, num_batches or
drop_last), and Lanczos's non-convergence warning names it when products are not reproducible."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torch_linop import GGNOperator, HessianOperator, lanczos, supervised_loss

DTYPE = torch.float64
LOSS = supervised_loss(F.cross_entropy)


def net(dropout: float = 0.0, train: bool = True) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(dropout), nn.Linear(4, 2)
        ).to(DTYPE)
    return model.train(train)


def loader(shuffle: bool, drop_last: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 2, (24,), generator=generator)
    shuffling = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(x, y), batch_size=5, shuffle=shuffle, drop_last=drop_last, generator=shuffling
    )


def warnings_of(build) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
    return [str(w.message) for w in caught if "not be reproducible" in str(w.message)]


@pytest.mark.parametrize(
    "case, expected",
    [
        (lambda: HessianOperator(net(dropout=0.2, train=True), loader(False), LOSS), ["dropout"]),
        (lambda: HessianOperator(net(train=True), loader(True), LOSS), ["BatchNorm"]),
        (lambda: GGNOperator(net(train=False), loader(True), LOSS, num_batches=2), ["num_batches"]),
        (
            lambda: HessianOperator(net(train=False), loader(True, drop_last=True), LOSS),
            ["drop_last"],
        ),
        (
            lambda: HessianOperator(net(dropout=0.5), loader(True, drop_last=True), LOSS),
            ["dropout", "BatchNorm", "drop_last"],
        ),
    ],
    ids=["dropout", "batchnorm_shuffled", "shuffled_subset", "shuffled_drop_last", "all_in_one"],
)
def test_one_warning_names_every_cause(case, expected):
    found = warnings_of(case)
    assert len(found) == 1
    for cause in expected:
        assert cause in found[0]


@pytest.mark.parametrize(
    "case",
    [
        lambda: HessianOperator(net(train=True), loader(False), LOSS),  # BatchNorm, fixed batches
        lambda: HessianOperator(net(train=False), loader(True), LOSS),  # eval, full shuffled pass
        lambda: HessianOperator(net(dropout=0.0, train=True), [next(iter(loader(False)))], LOSS),
    ],
    ids=["batchnorm_fixed_order", "eval_shuffled", "dropout_p0"],
)
def test_deterministic_setups_are_silent(case):
    assert warnings_of(case) == []


def test_lanczos_names_irreproducible_products():
    with pytest.warns(UserWarning, match="not be reproducible"):
        operator = HessianOperator(net(train=True), loader(True), LOSS)
    with pytest.warns(RuntimeWarning, match="the matrix changes between products") as record:
        lanczos(operator, k=2, seed=0, max_matvecs=12, tol=1e-10)
    assert "converged" in str(record[0].message)


def test_lanczos_keeps_the_plain_message_for_reproducible_products():
    operator = HessianOperator(net(train=False), loader(False), LOSS)
    with pytest.warns(RuntimeWarning) as record:
        lanczos(operator, k=2, seed=0, max_matvecs=4, tol=1e-14)
    message = str(record[0].message)
    assert "raise max_matvecs" in message and "changes between products" not in message


def test_a_custom_batch_sampler_without_a_sampler_is_accepted():
    class FixedBatches:
        def __iter__(self):
            return iter([[0, 1, 2], [3, 4]])

        def __len__(self):
            return 2

    data = loader(False).dataset
    custom = DataLoader(data, batch_sampler=FixedBatches())
    assert warnings_of(lambda: HessianOperator(net(train=True), custom, LOSS)) == []
