"""tlens_loss on a tiny float64 TransformerLens model (HookedTransformer, or TransformerLens 4's
native TransformerBridge): the loss is TransformerLens's own, and the GGN matches dense oracles
and the autograd GGN path."""

from __future__ import annotations

import pytest
import torch

from torch_linop import GGNOperator, HessianOperator, match_regex
from torch_linop._context import differentiable_attention
from torch_linop.losses.transformer_lens import (
    TransformerLensLoss,
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
)
from torch_linop.reference import dense_ggn, dense_hessian

pytest.importorskip("transformer_lens")

TOL = 1e-10
VOCAB = 11  # the tiny model of conftest.py
ATTENTION = match_regex(r"attn")  # blocks.0.attn.* (HookedTransformer) or layers.0...attn...


class AutogradCELoss(TransformerLensLoss):
    """The same loss with its closed-form output Hessian off: the GGN falls back to autograd."""

    def output_hessian_vector_product(self, output, batch, vectors):
        return None


@pytest.fixture
def token_data():
    """A plain token tensor and a dict batch with padding: 5 + 2 and 3 x 4 - 1 valid targets."""
    generator = torch.Generator().manual_seed(7)
    plain = torch.randint(0, VOCAB, (1, 6), generator=generator)
    padded = torch.randint(0, VOCAB, (3, 5), generator=generator)
    mask = torch.ones_like(padded)
    mask[2, 4:] = 0
    return [plain, {"tokens": padded, "attention_mask": mask}]


def tl_logits(model, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(batch["tokens"], return_type="logits", attention_mask=batch["attention_mask"])
    return model(batch, return_type="logits")


def tl_valid(batch) -> torch.Tensor:
    """Rows t with a target token t + 1 that is not padding (written without the library)."""
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    mask = batch["attention_mask"] if isinstance(batch, dict) else torch.ones_like(tokens)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:] == 1
    return valid


def dense_of(operator) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[0], dtype=torch.float64)


def test_loss_matches_transformer_lens(make_tlens, token_data):
    model = make_tlens()
    loss_fn = tlens_loss(fused="eager")
    assert [loss_fn.num_samples(b) for b in token_data] == [5, 11]
    with torch.no_grad():
        plain = token_data[0]
        torch.testing.assert_close(loss_fn(model, plain), model(plain, return_type="loss"))
        torch.testing.assert_close(
            loss_fn(model, {"tokens": plain}), model(plain, return_type="loss")
        )
        logits = tl_logits(model, token_data[1])
        per_token = loss_fn.per_sample_losses(logits, token_data[1])
        assert per_token.shape == (11,)
        torch.testing.assert_close(per_token.mean(), loss_fn.loss(logits, token_data[1]))


def test_ggn_matches_dense_oracles_and_autograd_path(make_tlens, token_data, ce_ggn_oracle):
    model = make_tlens()
    loss_fn = tlens_loss(fused="eager")
    for param_filter in (ATTENTION, None):
        ggn = dense_of(GGNOperator(model, token_data, loss_fn, param_filter=param_filter))
        with differentiable_attention():
            reference = dense_ggn(model, token_data, loss_fn, param_filter)
        independent = ce_ggn_oracle(model, token_data, tl_logits, tl_valid, param_filter)
        autograd = dense_of(
            GGNOperator(model, token_data, AutogradCELoss(), param_filter=param_filter)
        )
        assert ggn.abs().max() > 1e-3
        for other in (reference, independent, autograd):
            torch.testing.assert_close(ggn, other, rtol=0, atol=TOL)


def test_seed_style_split_call(make_tlens, token_data):
    model = make_tlens()
    split = GGNOperator(
        model,
        token_data,
        tlens_forward(),
        tlens_loss_of_output(fused="eager"),
        param_filter=ATTENTION,
    )
    unified = GGNOperator(model, token_data, tlens_loss(fused="eager"), param_filter=ATTENTION)
    assert split.num_data == unified.num_data == 16
    torch.testing.assert_close(dense_of(split), dense_of(unified), rtol=0, atol=TOL)


def test_hessian_matches_dense_hessian(make_tlens, token_data):
    model = make_tlens()
    loss_fn = tlens_loss(fused="eager")
    hessian = dense_of(HessianOperator(model, token_data, loss_fn, param_filter=ATTENTION))
    with differentiable_attention():
        reference = dense_hessian(model, token_data, loss_fn, ATTENTION)
    torch.testing.assert_close(hessian, reference, rtol=0, atol=TOL)


def test_bad_batches_are_rejected(make_tlens):
    loss_fn = tlens_loss()
    with pytest.raises(ValueError, match="'tokens'"):
        loss_fn.num_samples({"input_ids": torch.zeros(1, 3).long()})
    with pytest.raises(ValueError, match="integer tokens"):
        loss_fn.num_samples(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="token tensors or dicts"):
        loss_fn.num_samples([torch.zeros(1, 3).long()])
