"""hf_lm_loss on a tiny float64 GPT-2: the loss is HF's, and the GGN, Hessian, empirical and MC
Fisher match dense oracles (torch_linop.reference and an independent jacrev construction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    match_names,
)
from torch_linop._context import differentiable_attention
from torch_linop.losses.language_models import (
    HFCausalLMLoss,
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
)
from torch_linop.params import select_parameters
from torch_linop.reference import dense_empirical_fisher, dense_ggn, dense_hessian

pytest.importorskip("transformers")

ATTN_BLOCK = match_names("transformer.h.0.attn.*")
ATTN_QKV = match_names("transformer.h.0.attn.c_attn.*")
TOL = 1e-10
VOCAB = 13  # the tiny GPT-2 of conftest.py


def dense_of(operator) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[0], dtype=torch.float64)


def shifted_valid_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Written independently of the library: next-token targets and their validity mask."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return targets, targets != -100


def hf_logits(model, batch: dict) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def hf_valid(batch: dict) -> torch.Tensor:
    return shifted_valid_targets(batch)[1]


class AutogradCELoss(HFCausalLMLoss):
    """The same loss with its closed-form output Hessian switched off: the GGN uses autograd."""

    def output_hessian_vector_product(self, output, batch, vectors):
        return None


def test_loss_is_hf_loss_and_counts_valid_targets(make_gpt2, padded_data):
    model = make_gpt2()
    loss_fn = hf_lm_loss(fused="eager")
    for batch in padded_data:
        targets, valid = shifted_valid_targets(batch)
        assert loss_fn.num_samples(batch) == int(valid.sum())
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
            hf_loss = model(**{**batch, "labels": labels}).loss  # HF upcasts to float32
            ours = loss_fn(model, batch)
            per_token = loss_fn.per_sample_losses(logits, batch)
        manual = F.cross_entropy(logits[valid], targets[valid])
        torch.testing.assert_close(ours, manual, rtol=1e-13, atol=0)
        torch.testing.assert_close(ours.float(), hf_loss.float(), rtol=1e-6, atol=0)
        assert per_token.shape == (int(valid.sum()),)
        torch.testing.assert_close(per_token.mean(), ours, rtol=1e-13, atol=0)
    assert [loss_fn.num_samples(b) for b in padded_data] == [7, 10]


def test_batch_encoding_and_seed_style_call(make_gpt2, padded_data):
    from transformers import BatchEncoding

    model = make_gpt2()
    loss_fn = hf_lm_loss(fused="eager")
    encoding = BatchEncoding(padded_data[0])
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(model, encoding), loss_fn(model, padded_data[0]))
    operator = GGNOperator(model, [encoding], loss_fn, param_filter=ATTN_QKV)
    plain = GGNOperator(model, [padded_data[0]], loss_fn, param_filter=ATTN_QKV)
    torch.testing.assert_close(dense_of(operator), dense_of(plain), rtol=0, atol=TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ggn_matches_dense_oracles_and_autograd_path(make_gpt2, padded_data, ce_ggn_oracle, attn):
    model = make_gpt2(attn)
    loss_fn = hf_lm_loss(fused="eager")
    for param_filter in (ATTN_BLOCK, None):
        ggn = dense_of(GGNOperator(model, padded_data, loss_fn, param_filter=param_filter))
        with differentiable_attention():
            reference = dense_ggn(model, padded_data, loss_fn, param_filter)
        independent = ce_ggn_oracle(model, padded_data, hf_logits, hf_valid, param_filter)
        autograd = dense_of(
            GGNOperator(model, padded_data, AutogradCELoss(), param_filter=param_filter)
        )
        assert ggn.abs().max() > 1e-3  # a non-trivial matrix
        for other in (reference, independent, autograd):
            torch.testing.assert_close(ggn, other, rtol=0, atol=TOL)
        torch.testing.assert_close(ggn, ggn.T, rtol=0, atol=TOL)
        assert torch.linalg.eigvalsh(ggn).min() > -1e-12  # PSD


def test_token_weighted_mean_over_uneven_batches(make_gpt2, padded_data):
    """The dataset GGN weighs batches by valid tokens (7 and 10), not by sequences."""
    model = make_gpt2()
    loss_fn = hf_lm_loss(fused="eager")
    operator = GGNOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV)
    assert operator.num_data == 17
    per_batch = [
        dense_of(GGNOperator(model, [b], loss_fn, param_filter=ATTN_QKV)) for b in padded_data
    ]
    expected = (7 * per_batch[0] + 10 * per_batch[1]) / 17
    torch.testing.assert_close(dense_of(operator), expected, rtol=0, atol=TOL)
    # padding tokens change nothing: drop the padded row's tail and compare the first batch
    batch = padded_data[0]
    trimmed = {"input_ids": batch["input_ids"][1:, :3]}
    only_row = {
        "input_ids": batch["input_ids"][1:],
        "attention_mask": batch["attention_mask"][1:],
    }
    torch.testing.assert_close(
        dense_of(GGNOperator(model, [only_row], loss_fn, param_filter=ATTN_QKV)),
        dense_of(GGNOperator(model, [trimmed], loss_fn, param_filter=ATTN_QKV)),
        rtol=0,
        atol=TOL,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hessian_matches_dense_hessian(make_gpt2, padded_data, attn):
    model = make_gpt2(attn)
    loss_fn = hf_lm_loss(fused="eager")
    for param_filter in (ATTN_BLOCK, match_names("transformer.h.0.mlp.*", "lm_head.*")):
        hessian = dense_of(HessianOperator(model, padded_data, loss_fn, param_filter=param_filter))
        with differentiable_attention():
            reference = dense_hessian(model, padded_data, loss_fn, param_filter)
        assert reference.abs().max() > 1e-3
        torch.testing.assert_close(hessian, reference, rtol=0, atol=TOL)


def test_seed_style_split_call_uses_the_closed_form(make_gpt2, padded_data, monkeypatch):
    model = make_gpt2()
    loss_of_output = hf_lm_loss_of_output(fused="eager")
    calls = []
    original = type(loss_of_output).output_hessian_vector_product

    def counting(self, output, batch, vectors):
        calls.append(vectors.shape[0])
        return original(self, output, batch, vectors)

    monkeypatch.setattr(type(loss_of_output), "output_hessian_vector_product", counting)
    split = GGNOperator(model, padded_data, hf_lm_forward(), loss_of_output, param_filter=ATTN_QKV)
    unified = GGNOperator(model, padded_data, hf_lm_loss(fused="eager"), param_filter=ATTN_QKV)
    assert split.num_data == 17  # the token count travels through the split loss
    torch.testing.assert_close(dense_of(split), dense_of(unified), rtol=0, atol=TOL)
    assert calls, "the split GGN did not use the closed-form CE Hessian"
    with torch.no_grad():
        logits = hf_lm_forward()(model, padded_data[1])
        assert logits.shape == (3, 5, VOCAB)
        torch.testing.assert_close(
            loss_of_output(logits, padded_data[1]), hf_lm_loss()(model, padded_data[1])
        )


def test_fused_auto_matches_eager(make_gpt2, padded_data):
    model = make_gpt2()
    vectors = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    eager = GGNOperator(model, padded_data, hf_lm_loss(fused="eager")) @ vectors
    auto = GGNOperator(model, padded_data, hf_lm_loss()) @ vectors
    torch.testing.assert_close(auto, eager, rtol=0, atol=TOL)


def test_empirical_fisher_matches_per_token_gradients(make_gpt2, padded_data):
    model = make_gpt2()
    loss_fn = hf_lm_loss(fused="eager")
    fisher = dense_of(EmpiricalFisherOperator(model, padded_data, loss_fn, param_filter=ATTN_BLOCK))
    with differentiable_attention():
        reference = dense_empirical_fisher(model, padded_data, loss_fn, ATTN_BLOCK)
    # independent: gradients of each valid token's cross-entropy, one backward each
    params = list(select_parameters(model, ATTN_BLOCK).values())
    gradients = []
    for batch in padded_data:
        targets, valid = shifted_valid_targets(batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        for b, t in valid.nonzero().tolist():
            logits = model(**inputs).logits
            token_loss = F.cross_entropy(logits[b, t], targets[b, t])
            grads = torch.autograd.grad(token_loss, params)
            gradients.append(torch.cat([g.reshape(-1) for g in grads]))
    stacked = torch.stack(gradients)
    independent = stacked.T @ stacked / stacked.shape[0]
    assert stacked.shape[0] == 17
    torch.testing.assert_close(fisher, reference, rtol=0, atol=TOL)
    torch.testing.assert_close(fisher, independent, rtol=0, atol=TOL)


def test_mc_fisher_converges_to_the_ggn(make_gpt2, padded_data):
    model = make_gpt2()
    loss_fn = hf_lm_loss(fused="eager")
    ggn = dense_of(GGNOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV))

    def relative_error(mc_samples: int) -> float:
        mc = MCFisherOperator(
            model, padded_data, loss_fn, param_filter=ATTN_QKV, mc_samples=mc_samples, seed=3
        )
        estimate = dense_of(mc)
        torch.testing.assert_close(estimate, dense_of(mc), rtol=0, atol=0)  # a fixed matrix
        assert torch.linalg.eigvalsh(estimate).min() > -1e-12
        return float(torch.linalg.norm(estimate - ggn) / torch.linalg.norm(ggn))

    few, many = relative_error(2), relative_error(1000)
    assert many < 0.05, many
    assert many < few / 8, (few, many)


def test_attention_settings_are_restored(make_gpt2, padded_data):
    model = make_gpt2("sdpa")
    flags = (
        torch.backends.cuda.flash_sdp_enabled,
        torch.backends.cuda.mem_efficient_sdp_enabled,
        torch.backends.cuda.math_sdp_enabled,
    )
    seen_inside = []

    class Recording(HFCausalLMLoss):
        def forward(self, model, batch):
            seen_inside.append(([flag() for flag in flags], model.config._attn_implementation))
            return super().forward(model, batch)

    before = [flag() for flag in flags]
    operator = GGNOperator(model, padded_data, Recording(fused="eager"), param_filter=ATTN_QKV)
    operator @ torch.ones(operator.shape[0], dtype=torch.float64)
    HessianOperator(model, padded_data, Recording(fused="eager"), param_filter=ATTN_QKV).matvec(
        torch.ones(operator.shape[0], dtype=torch.float64)
    )
    assert seen_inside and all(inside == ([False, False, True], "sdpa") for inside in seen_inside)
    assert [flag() for flag in flags] == before
    assert model.config._attn_implementation == "sdpa"


def test_fused_attention_kernels_are_swapped_for_sdpa_during_products(make_gpt2, padded_data):
    """A model configured for FlashAttention (no forward-mode AD, no double backward) gets SDPA
    inside products; its setting is back afterwards."""
    model = make_gpt2("sdpa")
    loss_fn = hf_lm_loss(fused="eager")
    expected_ggn = dense_of(GGNOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV))
    expected_hessian = dense_of(HessianOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(Exception):  # noqa: B017 - flash-attn is not installed here
        model(input_ids=padded_data[0]["input_ids"])
    ggn = dense_of(GGNOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV))
    hessian = dense_of(HessianOperator(model, padded_data, loss_fn, param_filter=ATTN_QKV))
    torch.testing.assert_close(ggn, expected_ggn, rtol=0, atol=TOL)
    torch.testing.assert_close(hessian, expected_hessian, rtol=0, atol=TOL)
    assert model.config._attn_implementation == "flash_attention_2"


def test_bad_input_is_rejected_where_it_enters(make_gpt2, padded_data):
    model = make_gpt2()
    with pytest.raises(ValueError, match="fused='fast'"):
        hf_lm_loss(fused="fast")
    with pytest.raises(TypeError, match="dicts or BatchEncodings"):
        hf_lm_loss()(model, padded_data[0]["input_ids"])
    with pytest.raises(ValueError, match="'input_ids'"):
        hf_lm_loss().num_samples({"tokens": padded_data[0]["input_ids"]})
    bad_labels = {"input_ids": padded_data[0]["input_ids"], "labels": torch.zeros(2, 3).long()}
    with pytest.raises(ValueError, match="do not match input_ids"):
        hf_lm_loss().num_samples(bad_labels)
    logits = torch.zeros(2, 1, VOCAB, dtype=torch.float64)
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf_lm_loss().loss(logits, padded_data[0])


class TinyCausalLM(torch.nn.Module):
    """Not an HF model: takes input_ids and attention_mask, returns a logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(9)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 4, generator=generator).double())
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=generator).double())
        self.unembed = torch.nn.Parameter(torch.randn(VOCAB, 4, generator=generator).double())

    def forward(self, input_ids, attention_mask=None):
        hidden = torch.tanh(self.embed[input_ids].cumsum(dim=1) @ self.mix)
        return hidden @ self.unembed.T


def test_plain_module_returning_a_tensor(make_gpt2, padded_data, ce_ggn_oracle):
    """Any module taking the batch's keywords works; it gets no HF-only use_cache argument."""
    model = TinyCausalLM()
    loss_fn = hf_lm_loss(fused="eager")
    ggn = dense_of(GGNOperator(model, padded_data, loss_fn))
    independent = ce_ggn_oracle(model, padded_data, lambda m, b: m(b["input_ids"]), hf_valid, None)
    torch.testing.assert_close(ggn, independent, rtol=0, atol=TOL)


@pytest.mark.parametrize("fused", ["eager", "compile", "auto"])
def test_in_place_output_hessian_product_overwrites_owned_vectors(padded_data, fused):
    """The GGN passes its own JVPs: the loss writes the CE Hessian product into them (no second
    logits-sized buffer), the same numbers as the out-of-place product, which leaves its input
    alone."""
    loss_fn = hf_lm_loss(fused=fused)
    batch = padded_data[0]
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, VOCAB, generator=generator, dtype=torch.float64)
    vectors = torch.randn(2, 2, 6, VOCAB, generator=generator, dtype=torch.float64)
    original = vectors.clone()
    expected = loss_fn.output_hessian_vector_product(logits, batch, vectors)
    assert torch.equal(vectors, original)
    result = loss_fn.output_hessian_vector_product_(logits, batch, vectors)
    assert result.data_ptr() == vectors.data_ptr()
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-15)
    # a hand-written oracle for one column: (p * u - p <p, u>) / n_valid on rows with a target
    targets, valid = shifted_valid_targets(batch)
    p = logits.softmax(-1)
    u = original[0]
    oracle = (p * u - p * (p * u).sum(-1, keepdim=True)) * valid[..., None] / valid.sum()
    torch.testing.assert_close(result[0], oracle, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", ["eager", "auto"])
def test_cached_graph_ggn_and_fishers_match_dense_oracles(make_gpt2, padded_data, attn, fused):
    """``cache_graph=True`` on a causal LM (padding, ignored labels, two uneven batches): the
    GGN equals the dense GGN built on the math attention backend (its kept graph is built with
    the model's own attention, its JVPs on the math backend), the MC Fisher equals the uncached
    one, and the empirical Fisher the dense one; twice, on the kept graphs."""
    model = make_gpt2(attn)
    loss_fn = hf_lm_loss(fused=fused)
    ggn = GGNOperator(model, padded_data, loss_fn, param_filter=ATTN_BLOCK, cache_graph=True)
    with differentiable_attention():
        reference = dense_ggn(model, padded_data, loss_fn, ATTN_BLOCK)
        fisher_reference = dense_empirical_fisher(model, padded_data, loss_fn, ATTN_BLOCK)
    for _ in range(2):
        torch.testing.assert_close(dense_of(ggn), reference, rtol=0, atol=TOL)
    assert ggn._graphs is not None and len(ggn._graphs) == 2
    mc = MCFisherOperator(
        model, padded_data, loss_fn, param_filter=ATTN_BLOCK, mc_samples=2, cache_graph=True
    )
    expected = dense_of(
        MCFisherOperator(model, padded_data, loss_fn, param_filter=ATTN_BLOCK, mc_samples=2)
    )
    torch.testing.assert_close(dense_of(mc), expected, rtol=0, atol=TOL)
    fisher = EmpiricalFisherOperator(
        model, padded_data, loss_fn, param_filter=ATTN_BLOCK, cache_graph=True
    )
    for _ in range(2):
        torch.testing.assert_close(dense_of(fisher), fisher_reference, rtol=0, atol=TOL)
