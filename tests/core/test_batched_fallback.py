import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_linop import GGNOperator, HessianOperator, supervised_loss


class Flaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.fail_next = False

    def forward(self, x):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("one-off failure of the user's model")
        return self.lin(x)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_one_off_model_error_keeps_batching(cls):
    torch.manual_seed(0)
    model = Flaky()
    op = cls(
        model,
        [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))],
        supervised_loss(F.cross_entropy),
    )
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    expected = op @ V
    model.fail_next = True
    with pytest.raises(RuntimeError, match="one-off"):
        op @ V
    if cls is HessianOperator:
        assert op.capabilities.batched_backward.supported is True
    else:
        assert op.capabilities.vmap_jvp.supported is True
        assert op.capabilities.batched_backward.supported is True
    torch.testing.assert_close(op @ V, expected)
