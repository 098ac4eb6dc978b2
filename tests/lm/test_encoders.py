"""hf_masked_lm_loss (tiny float64 BERT) and hf_classification_loss (BERT sequence classifier,
ViT image classifier): the loss is HF's own, and the GGN (closed-form CE middle by the fused
kernel) matches an independent jacrev oracle; hf_seq2seq_loss on an encoder-only model points
to them."""

from __future__ import annotations

import pytest
import torch

from torch_linop import GGNOperator, HessianOperator, match_names
from torch_linop.losses.encoders import hf_classification_loss, hf_masked_lm_loss
from torch_linop.losses.language_models import hf_seq2seq_loss
from torch_linop.reference import dense_hessian

transformers = pytest.importorskip("transformers")

TOL = 1e-10
VOCAB = 13
BERT_SUBSET = match_names("*layer.0.attention.self.query.*", "*layer.0.output.dense.bias")


def bert_config(**extra):
    transformers.utils.logging.set_verbosity_error()
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def build(model_class, config):
    torch.manual_seed(0)
    return model_class(config).to(torch.float64).eval()


def masked_lm_data():
    """Two batches with -100 where a token was not masked: 3 and 2 masked tokens."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for batch, length, masked in ((2, 5, [(0, 1), (1, 0), (1, 3)]), (1, 6, [(0, 2), (0, 5)])):
        input_ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
        labels = torch.full_like(input_ids, -100)
        for b, t in masked:
            labels[b, t] = input_ids[b, t]
            input_ids[b, t] = 1  # the [MASK] token
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        )
    return batches


def test_masked_lm_loss_is_hf_loss_and_ggn_matches_the_oracle(ce_ggn_oracle):
    model = build(transformers.BertForMaskedLM, bert_config())
    data = masked_lm_data()
    loss_fn = hf_masked_lm_loss(fused="eager")
    assert [loss_fn.num_samples(b) for b in data] == [3, 2]
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(
                loss_fn(model, batch), model(**batch).loss, rtol=1e-12, atol=0
            )

    def logits(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    ggn = GGNOperator(model, data, loss_fn, param_filter=BERT_SUBSET)
    dense = ggn @ torch.eye(ggn.shape[0], dtype=torch.float64)
    oracle = ce_ggn_oracle(model, data, logits, lambda b: b["labels"] != -100, BERT_SUBSET)
    assert dense.abs().max() > 1e-4
    torch.testing.assert_close(dense, oracle, rtol=0, atol=TOL)


def classifier_case(kind: str):
    generator = torch.Generator().manual_seed(4)
    if kind == "bert":
        model = build(transformers.BertForSequenceClassification, bert_config(num_labels=3))
        batches = [
            {"input_ids": torch.randint(1, VOCAB, (size, 4), generator=generator)}
            for size in (3, 2)
        ]
        subset = match_names("classifier.*", "bert.pooler.dense.bias")
    else:
        config = transformers.ViTConfig(
            image_size=4,
            patch_size=2,
            num_channels=1,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        )
        model = build(transformers.ViTForImageClassification, config)
        batches = [
            {"pixel_values": torch.randn(size, 1, 4, 4, generator=generator, dtype=torch.float64)}
            for size in (3, 2)
        ]
        subset = match_names("classifier.*", "vit.layernorm.*")
    for batch in batches:
        batch["labels"] = torch.randint(
            0, 3, (len(next(iter(batch.values()))),), generator=generator
        )
    batches[0]["labels"][1] = -100
    return model, batches, subset


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_classification_loss_is_hf_loss_and_ggn_matches_the_oracle(kind, ce_ggn_oracle):
    model, data, subset = classifier_case(kind)
    loss_fn = hf_classification_loss(fused="eager")
    assert [loss_fn.num_samples(b) for b in data] == [2, 2]
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(
                loss_fn(model, batch), model(**batch).loss, rtol=1e-12, atol=0
            )

    def logits(model, batch):  # (B, 1, C): one "token" per sample for the oracle
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.unsqueeze(1)

    ggn = GGNOperator(model, data, loss_fn, param_filter=subset)
    dense = ggn @ torch.eye(ggn.shape[0], dtype=torch.float64)
    oracle = ce_ggn_oracle(
        model, data, logits, lambda b: (b["labels"] != -100).unsqueeze(1), subset
    )
    assert dense.abs().max() > 1e-4
    torch.testing.assert_close(dense, oracle, rtol=0, atol=TOL)
    hessian = HessianOperator(model, data, loss_fn, param_filter=subset)
    torch.testing.assert_close(
        hessian @ torch.eye(hessian.shape[0], dtype=torch.float64),
        dense_hessian(model, data, loss_fn, subset),
        rtol=0,
        atol=TOL,
    )


def test_classification_loss_refuses_float_labels():
    model, data, _ = classifier_case("bert")
    data[0]["labels"] = data[0]["labels"].double()
    with pytest.raises(TypeError, match="needs integer class labels"):
        hf_classification_loss()(model, data[0])


def test_seq2seq_loss_on_an_encoder_only_model_points_to_the_right_helper():
    model = build(transformers.BertForMaskedLM, bert_config())
    with pytest.raises(TypeError, match="hf_masked_lm_loss()") as raised:
        hf_seq2seq_loss()(model, masked_lm_data()[0])
    assert "hf_classification_loss()" in str(raised.value)
    assert "decoder_input_ids" not in str(raised.value)
