"""Losses for HuggingFace encoder-only models: masked language models (BERT-style,
``hf_masked_lm_loss``) and classifiers whose output has ``.logits`` (``...ForSequenceClassification``,
``ViTForImageClassification``: ``hf_classification_loss``).

Both are HF's own cross-entropy with unshifted labels (``ignore_index`` where there is no
target), averaged over the labels that have one, so they share the causal LM's machinery: the
token-weighted data loop and the closed-form cross-entropy Hessian by the fused kernel
:func:`torch_linop.kernels.ce_hvp.ce_hvp` as the GGN's middle factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torch_linop.losses.language_models import (
    TokenCrossEntropyLoss,
    as_mapping,
    hf_model_inputs,
    logits_of,
)


class HFMaskedLMLoss(TokenCrossEntropyLoss):
    """Masked-LM cross-entropy on dict / ``BatchEncoding`` batches with ``input_ids`` and
    ``labels`` of the same shape: ``-100`` (``ignore_index``) at every position that was not
    masked, the original token where it was (as ``DataCollatorForLanguageModeling`` makes
    them). Mean over the masked tokens; equals ``model(**batch).loss``."""

    shift = False
    helper_name = "hf_masked_lm_loss"

    def labels(self, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "labels")
        labels = mapping["labels"]
        input_ids = mapping.get("input_ids")
        if isinstance(input_ids, torch.Tensor) and labels.shape != input_ids.shape:
            raise ValueError(
                f"{self.helper_name}: labels of shape {tuple(labels.shape)} do not match "
                f"input_ids of shape {tuple(input_ids.shape)}; a masked LM has one label per "
                "token (ignore_index where the token was not masked)"
            )
        return labels

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "labels")
        return logits_of(model(**hf_model_inputs(mapping, model)))


class HFClassificationLoss(TokenCrossEntropyLoss):
    """Single-label classification cross-entropy of models returning ``(B, C)`` logits (HF
    ``...ForSequenceClassification``, ``ViTForImageClassification``) on dict batches with the
    model's inputs (``input_ids``/``attention_mask`` or ``pixel_values``) and integer
    ``labels`` of shape ``(B,)``. Mean over the labels that are not ``ignore_index``."""

    shift = False
    helper_name = "hf_classification_loss"

    def labels(self, batch: Any) -> torch.Tensor:
        labels = as_mapping(batch, self.helper_name, "labels")["labels"]
        if labels.is_floating_point():
            raise TypeError(
                f"{self.helper_name} is single-label cross-entropy and needs integer class "
                f"labels, got {labels.dtype}; for regression or multi-label models call the "
                "model yourself with supervised_loss(F.mse_loss) / "
                "supervised_loss(F.binary_cross_entropy_with_logits) on (inputs, targets) batches"
            )
        return labels

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "labels")
        return logits_of(model(**hf_model_inputs(mapping, model)))


def hf_masked_lm_loss(*, fused: str = "auto", ignore_index: int = -100) -> HFMaskedLMLoss:
    """Loss for HuggingFace masked language models (BERT, RoBERTa, ...): cross-entropy of the
    masked tokens (``labels`` not ``ignore_index``), mean over them, no shift.

    Example: ``GGNOperator(model, [collator(examples)], hf_masked_lm_loss())``. ``fused``
    picks the CE Hessian backend of the GGN, as for :func:`hf_lm_loss`."""
    return HFMaskedLMLoss(fused=fused, ignore_index=ignore_index)


def hf_classification_loss(
    *, fused: str = "auto", ignore_index: int = -100
) -> HFClassificationLoss:
    """Loss for HuggingFace classifiers whose output has ``.logits`` of shape ``(B, C)``
    (``...ForSequenceClassification``, ``ViTForImageClassification``): cross-entropy of the
    integer ``labels``, mean over the batch.

    Example: ``HessianOperator(model, [{"pixel_values": x, "labels": y}],
    hf_classification_loss())``."""
    return HFClassificationLoss(fused=fused, ignore_index=ignore_index)
