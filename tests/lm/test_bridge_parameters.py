"""TransformerLens 4's bridge registers its blocks twice (``blocks`` and ``layers``): products
must leave every ``nn.Parameter`` of the model in place, under every name (issue 19)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_linop import GGNOperator, HessianOperator
from torch_linop.losses.transformer_lens import tlens_loss

pytest.importorskip("transformer_lens")


@pytest.mark.parametrize("operator_class", [HessianOperator, GGNOperator])
def test_products_keep_the_bridge_parameters(make_tlens, operator_class):
    model = make_tlens()
    every_name = dict(model.named_parameters(remove_duplicate=False))
    assert len(every_name) > len(dict(model.named_parameters())) or pytest.skip(
        "this TransformerLens registers no module twice"
    )
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    operator = operator_class(model, [tokens], tlens_loss())
    operator @ torch.ones(operator.shape[0], dtype=torch.float64)
    for name, param in model.named_parameters(remove_duplicate=False):
        assert param is every_name[name], name
        assert isinstance(param, nn.Parameter), name
