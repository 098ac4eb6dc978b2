"""hf_lm_loss(fused_head=True): the GGN and MC Fisher computed tile by tile from hidden states
and the unembedding equal the plain (materialised-logits) products on tiny GPT-2s, with tied
and untied heads, a head bias, and tiles that do not divide the rows or the vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    match_names,
)
from torch_linop.losses.fused_lm_head import HFFusedHeadLoss
from torch_linop.losses.language_models import hf_lm_loss

pytest.importorskip("transformers")

TOL = 1e-10


def untied_with_bias(make_gpt2) -> nn.Module:
    """GPT-2 whose LM head is its own nn.Linear with a bias (not tied to the embedding)."""
    model = make_gpt2(seed=2)
    generator = torch.Generator().manual_seed(4)
    head = nn.Linear(8, model.config.vocab_size, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float64))
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator, dtype=torch.float64))
    model.config.tie_word_embeddings = False
    model.lm_head = head
    return model


def dense_of(operator) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("head_tile", [(4, 5), (1024, 8192)])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_ggn_equals_plain_ggn(make_gpt2, padded_data, head_tile, tied):
    model = make_gpt2() if tied else untied_with_bias(make_gpt2)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    fused = GGNOperator(model, padded_data, hf_lm_loss(fused_head=True, head_tile=head_tile))
    plain = GGNOperator(model, padded_data, hf_lm_loss(fused="eager"))
    assert fused.shape == plain.shape
    dense = dense_of(fused)
    assert dense.abs().max() > 1e-3
    torch.testing.assert_close(dense, dense_of(plain), rtol=0, atol=TOL)


def test_fused_head_on_a_parameter_block(make_gpt2, padded_data):
    """Only the head and the last block selected: the head weight's own tangent and
    gradient paths carry the whole product."""
    model = untied_with_bias(make_gpt2)
    block = match_names("lm_head.*", "transformer.ln_f.*")
    fused = GGNOperator(
        model, padded_data, hf_lm_loss(fused_head=True, head_tile=(3, 4)), param_filter=block
    )
    plain = GGNOperator(model, padded_data, hf_lm_loss(fused="eager"), param_filter=block)
    torch.testing.assert_close(dense_of(fused), dense_of(plain), rtol=0, atol=TOL)


def test_fused_head_mc_fisher_draws_the_same_samples(make_gpt2, padded_data):
    model = untied_with_bias(make_gpt2)
    block = match_names("transformer.h.0.attn.c_attn.*", "lm_head.bias")
    fused = MCFisherOperator(
        model,
        padded_data,
        hf_lm_loss(fused_head=True, head_tile=(5, 4)),
        param_filter=block,
        mc_samples=3,
        seed=11,
    )
    plain = MCFisherOperator(
        model, padded_data, hf_lm_loss(fused="eager"), param_filter=block, mc_samples=3, seed=11
    )
    torch.testing.assert_close(dense_of(fused), dense_of(plain), rtol=0, atol=TOL)


def test_fused_head_loss_hessian_and_empirical_fisher(make_gpt2, padded_data):
    """The other operators see the same loss (logits built from the packed output)."""
    model = make_gpt2()
    fused_loss = hf_lm_loss(fused_head=True)
    plain_loss = hf_lm_loss(fused="eager")
    with torch.no_grad():
        for batch in padded_data:
            torch.testing.assert_close(fused_loss(model, batch), plain_loss(model, batch))
    block = match_names("transformer.h.0.mlp.c_proj.*")
    for operator in (HessianOperator, EmpiricalFisherOperator):
        torch.testing.assert_close(
            dense_of(operator(model, padded_data, fused_loss, param_filter=block)),
            dense_of(operator(model, padded_data, plain_loss, param_filter=block)),
            rtol=0,
            atol=TOL,
        )


def test_fused_head_rejects_what_it_cannot_fuse(make_gpt2, padded_data):
    model = make_gpt2()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf_lm_loss(fused_head=True).forward(model, padded_data[0])
    with pytest.raises(ValueError, match="row_tile"):
        HFFusedHeadLoss(row_tile=0)
    with pytest.raises(ValueError, match="head_tile"):
        hf_lm_loss(fused_head=True, head_tile=(4,))
    with pytest.raises(RuntimeError, match="forward"):
        HFFusedHeadLoss().output_hessian_vector_product(
            torch.zeros(3), padded_data[0], torch.zeros(1, 3)
        )


def test_fused_head_single_vector_and_float32(make_gpt2, padded_data):
    """The one-column path (dual numbers, no vmap), and a float32 model accumulating in
    float32, against the float64 plain product."""
    model = untied_with_bias(make_gpt2)
    loss = hf_lm_loss(fused_head=True, head_tile=(4, 6))
    vector = torch.randn(
        sum(p.numel() for p in model.parameters()),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    expected = GGNOperator(model, padded_data, hf_lm_loss(fused="eager")).matvec(vector)
    torch.testing.assert_close(
        GGNOperator(model, padded_data, loss).matvec(vector), expected, rtol=0, atol=TOL
    )
    single = model.float()
    result = GGNOperator(single, padded_data, loss).matvec(vector.float())
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operator creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_fused_head_never_builds_the_logits(make_gpt2):
    """With V = 64 >> d = 8, no tensor of a fused-head GGN matvec reaches N x V elements,
    while the plain product builds the logits (and the test would see them)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(torch.float64).eval()
    data = [
        {"input_ids": torch.randint(0, 64, (4, 15), generator=torch.Generator().manual_seed(1))}
    ]
    num_logits = 4 * 15 * 64  # 3840; the parameter vector has 1528 entries
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    results = {}
    for name, loss in (
        ("fused", hf_lm_loss(fused_head=True, head_tile=(8, 16))),
        ("plain", hf_lm_loss(fused="eager")),
    ):
        operator = GGNOperator(model, data, loss)
        assert operator.num_data == 56  # counted outside the recording
        with LargestTensor() as recorder:
            results[name] = operator.matvec(vector)
        results[name + "_largest"] = recorder.largest
    assert results["plain_largest"] >= num_logits
    assert results["fused_largest"] < num_logits, results["fused_largest"]
    torch.testing.assert_close(results["fused"], results["plain"], rtol=0, atol=TOL)
