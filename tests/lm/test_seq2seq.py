"""hf_seq2seq_loss on a tiny float64 BART: the loss is HF's own, the GGN matches dense oracles.

(BART rather than T5: T5's layer norm computes its variance in float32 even for float64 models,
which would cap the agreement between forward- and reverse-mode derivatives near 1e-8.)"""

from __future__ import annotations

import pytest
import torch

from torch_linop import GGNOperator, match_names
from torch_linop._context import differentiable_attention
from torch_linop.losses.language_models import hf_seq2seq_loss
from torch_linop.reference import dense_ggn

transformers = pytest.importorskip("transformers")

TOL = 1e-10
DECODER_ATTENTION = match_names("model.decoder.layers.0.encoder_attn.*", "model.shared.weight")


@pytest.fixture
def bart():
    transformers.utils.logging.set_verbosity_error()
    config = transformers.BartConfig(
        vocab_size=13,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).to(torch.float64).eval()


@pytest.fixture
def seq2seq_data():
    generator = torch.Generator().manual_seed(5)
    batches = []
    for batch, source, target in ((2, 5, 4), (1, 6, 5)):
        input_ids = torch.randint(2, 13, (batch, source), generator=generator)
        labels = torch.randint(2, 13, (batch, target), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
        batches[-1]["labels"] = labels
    batches[0]["labels"][1, 3] = -100  # 7 and 5 targets
    return batches


def bart_logits(model, batch) -> torch.Tensor:
    """Decoder inputs made here: labels shifted right after the start token, -100 -> pad."""
    labels = batch["labels"]
    decoder_input_ids = torch.full_like(labels, model.config.decoder_start_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[decoder_input_ids == -100] = model.config.pad_token_id
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, decoder_input_ids=decoder_input_ids).logits


def test_loss_is_hf_loss(bart, seq2seq_data):
    loss_fn = hf_seq2seq_loss(fused="eager")
    assert [loss_fn.num_samples(b) for b in seq2seq_data] == [7, 5]
    with torch.no_grad():
        for batch in seq2seq_data:
            torch.testing.assert_close(
                loss_fn(bart, batch).float(), bart(**batch).loss.float(), rtol=1e-6, atol=0
            )


def test_ggn_matches_dense_oracles(bart, seq2seq_data, ce_ggn_oracle):
    loss_fn = hf_seq2seq_loss(fused="eager")
    ggn = GGNOperator(bart, seq2seq_data, loss_fn, param_filter=DECODER_ATTENTION)
    dense = ggn @ torch.eye(ggn.shape[0], dtype=torch.float64)
    with differentiable_attention():
        reference = dense_ggn(bart, seq2seq_data, loss_fn, DECODER_ATTENTION)
    independent = ce_ggn_oracle(
        bart, seq2seq_data, bart_logits, lambda b: b["labels"] != -100, DECODER_ATTENTION
    )
    assert dense.abs().max() > 1e-3
    torch.testing.assert_close(dense, reference, rtol=0, atol=TOL)
    torch.testing.assert_close(dense, independent, rtol=0, atol=TOL)


def test_labels_are_required(bart):
    with pytest.raises(ValueError, match="'labels'"):
        hf_seq2seq_loss()(bart, {"input_ids": torch.ones(1, 3).long()})
