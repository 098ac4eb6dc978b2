"""Losses for TransformerLens models (``HookedTransformer``, and the ``TransformerBridge`` of
TransformerLens 4): ``tlens_loss`` plus the seed library's split names (``tlens_forward``,
``tlens_loss_of_output``).

The model is called as ``model(tokens, return_type="logits")``; the loss is the causal-LM token
cross-entropy (logit t predicts token t + 1) averaged over the tokens that have a target, with
the closed-form CE Hessian for the GGN. Nothing here imports ``transformer_lens``.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torch_linop.losses.language_models import TokenCrossEntropyLoss, logits_of


def _tokens_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids and optional attention mask of a batch: a (B, T) tensor or a dict with
    ``"tokens"`` (and optionally ``"attention_mask"``)."""
    if isinstance(batch, torch.Tensor):
        tokens, mask = batch, None
    elif isinstance(batch, (Mapping, UserDict)):
        if "tokens" not in batch:
            raise ValueError(
                f"tlens_loss batches that are dicts need a 'tokens' entry, got keys "
                f"{sorted(batch.keys())}"
            )
        tokens, mask = batch["tokens"], batch.get("attention_mask")
    else:
        raise TypeError(
            "tlens_loss expects batches that are (B, T) token tensors or dicts with 'tokens', "
            f"got {type(batch).__name__}"
        )
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(
            "tlens_loss needs integer tokens of shape (batch, seq), got "
            + (
                f"a {tokens.dtype} tensor of shape {tuple(tokens.shape)}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            + "; tokenize first (model.to_tokens(text))"
        )
    return tokens, mask


class TransformerLensLoss(TokenCrossEntropyLoss):
    """Causal-LM cross-entropy of a TransformerLens model on token batches; positions where
    ``attention_mask == 0`` (padding) are not targets."""

    shift = True
    helper_name = "tlens_loss"

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, mask = _tokens_and_mask(batch)
        if mask is None:
            return logits_of(model(tokens, return_type="logits"))
        return logits_of(model(tokens, return_type="logits", attention_mask=mask))

    def labels(self, batch: Any) -> torch.Tensor:
        tokens, mask = _tokens_and_mask(batch)
        return tokens if mask is None else tokens.masked_fill(mask == 0, self.ignore_index)


class _TransformerLensLossOfOutput(TransformerLensLoss):
    """``loss_of_output_fn(logits, batch)`` form of :class:`TransformerLensLoss`."""

    def __call__(self, output: torch.Tensor, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return self.loss(output, batch)


class _TransformerLensForward:
    """``forward_fn(model, batch)``: ``model(tokens, return_type="logits")``."""

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return TransformerLensLoss(fused="eager").forward(model, batch)


def tlens_loss(*, fused: str = "auto", ignore_index: int = -100) -> TransformerLensLoss:
    """Loss for TransformerLens models on token batches (tensor or ``{"tokens": ...}``):
    next-token cross-entropy, mean over tokens with a target. Drives every operator."""
    return TransformerLensLoss(fused=fused, ignore_index=ignore_index)


def tlens_forward() -> _TransformerLensForward:
    """Seed-compatible ``forward_fn``: the logits of a TransformerLens model."""
    return _TransformerLensForward()


def tlens_loss_of_output(
    fused: str = "auto", *, ignore_index: int = -100
) -> _TransformerLensLossOfOutput:
    """Seed-compatible ``loss_of_output_fn(logits, batch)`` carrying the closed-form CE Hessian."""
    return _TransformerLensLossOfOutput(fused=fused, ignore_index=ignore_index)
