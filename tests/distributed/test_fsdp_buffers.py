"""Sharded operators never change the model: batch-norm running statistics of a model in
training mode are the same after products (and after a failing product) as before. One-process
gloo group, so the test runs in the test process."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torch_linop import supervised_loss


@pytest.fixture
def one_process_group():
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_training_mode_buffers_are_unchanged_by_products(one_process_group):
    from torch.distributed.fsdp import fully_shard

    from torch_linop.distributed import FSDPGGNOperator, FSDPHessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double().train()
    fully_shard(model)
    data = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    loss = supervised_loss(F.cross_entropy)
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    for op in (
        FSDPGGNOperator(model, data, loss),
        FSDPHessianOperator(model, data, loss),
        FSDPHessianOperator(model, data, loss, method="autograd"),
    ):
        vector = op.shard_vector(torch.ones(op.shape[0], dtype=torch.float64))
        op @ vector
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, before[name]), f"{type(op).__name__} moved {name}"
    failing = FSDPGGNOperator(
        model, [(torch.full((16, 6), float("nan")).double(), data[0][1])], loss
    )
    with pytest.raises(ValueError, match="not finite"):
        failing @ failing.shard_vector(torch.ones(failing.shape[0], dtype=torch.float64))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"a failing product moved {name}"
