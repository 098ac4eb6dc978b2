"""Losses for HuggingFace language models: causal LMs (``hf_lm_loss``) and encoder-decoders
(``hf_seq2seq_loss``), plus the seed library's split names (``hf_lm_forward``,
``hf_lm_loss_of_output``).

One object drives the Hessian, GGN, empirical Fisher and MC Fisher: the forward pass returns the
logits (the model is called without labels, so HF computes no loss of its own), the loss is HF's
token-level cross-entropy averaged over the tokens that have a target, and the GGN's middle
factor is the closed-form cross-entropy Hessian computed by the fused kernel
:func:`torch_linop.kernels.ce_hvp.ce_hvp`. Nothing here imports ``transformers``: batches are
duck-typed mappings (``dict`` or ``BatchEncoding``).
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.kernels.ce_hvp import ce_hvp
from torch_linop.losses import closed_form
from torch_linop.losses.base import LossFunction

FUSED_BACKENDS = ("auto", "triton", "compile", "eager")


def check_fused(fused: str) -> str:
    """Validate the ``fused=`` choice of CE Hessian backend."""
    if fused not in FUSED_BACKENDS:
        raise ValueError(
            f"fused={fused!r} is not a cross-entropy Hessian backend; use one of {FUSED_BACKENDS} "
            "('auto': Triton on CUDA, else torch.compile, else eager)"
        )
    return fused


def as_mapping(batch: Any, helper: str, required: str) -> Mapping[str, Any]:
    """The batch as a mapping (``dict`` or ``BatchEncoding``), or a TypeError naming the fix."""
    if isinstance(batch, (Mapping, UserDict)):
        if required not in batch:
            raise ValueError(
                f"{helper} batches need an {required!r} entry, got keys {sorted(batch.keys())}"
            )
        return batch
    raise TypeError(
        f"{helper} expects batches that are dicts or BatchEncodings with {required!r} (as a "
        f"tokenizer returns them), got {type(batch).__name__}; wrap token tensors as "
        f"{{{required!r}: tokens}}"
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: ``ModelOutput.logits``, a tuple's first entry, or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in the model output of type {type(output).__name__}; the model must "
        "return a tensor, a tuple starting with the logits, or an object with .logits"
    )


def shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets aligned with the logits under HF's causal shift: position t is scored against
    ``labels[..., t + 1]``; the last position gets ``ignore_index``. Shape of ``labels``."""
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


class TokenCrossEntropyLoss(LossFunction):
    """Mean cross-entropy over the tokens that have a target, for (B, T, V) logits.

    Subclasses say how to run the model (``forward``) and where the labels come from
    (``labels``); ``shift=True`` is the causal-LM convention (logit t predicts label t + 1). The
    dataset matrix is the token-weighted mean: ``num_samples`` counts the tokens with a target.
    """

    reduction = "mean"
    shift: bool = True
    helper_name: str = "TokenCrossEntropyLoss"

    def __init__(self, *, fused: str = "auto", ignore_index: int = -100) -> None:
        self.fused = check_fused(fused)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    # ------------------------------------------------------------------ what subclasses provide
    def labels(self, batch: Any) -> torch.Tensor:
        """Unshifted (B, T) integer labels, ``ignore_index`` where there is no target."""
        raise NotImplementedError

    # ------------------------------------------------------------------ targets and counts
    def targets(self, batch: Any) -> torch.Tensor:
        """(B, T) targets aligned with the logits rows (shifted for causal LMs)."""
        labels = self.labels(batch)
        return shifted_targets(labels, self.ignore_index) if self.shift else labels

    def num_samples(self, batch: Any) -> int:
        """Number of tokens with a target (after the shift): the loss averages over these."""
        return int((self.targets(batch) != self.ignore_index).sum())

    def _check_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"{self.helper_name}: logits of shape {tuple(logits.shape)} do not match labels "
                f"of shape {tuple(labels.shape)}; the model must return logits for every position "
                "(do not pass logits_to_keep / num_logits_to_keep)"
            )

    def _flat_logits(self, output: torch.Tensor) -> torch.Tensor:
        # a view for contiguous logits; half precision is upcast as HF's own loss does
        flat = output.reshape(-1, output.shape[-1])
        return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat

    # ------------------------------------------------------------------ loss
    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """HF's causal-LM loss: summed token cross-entropy over valid targets / their number."""
        targets = self.targets(batch)
        self._check_logits(output, targets)
        total = F.cross_entropy(
            self._flat_logits(output),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        count = (targets != self.ignore_index).sum().clamp(min=1)
        return total / count.to(total.dtype)

    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Cross-entropy of every token with a target, shape ``(num_samples,)``."""
        targets = self.targets(batch)
        self._check_logits(output, targets)
        flat_targets = targets.reshape(-1)
        losses = F.cross_entropy(
            self._flat_logits(output),
            flat_targets,
            ignore_index=self.ignore_index,
            reduction="none",
        )
        # index with precomputed positions (not a boolean mask) so vmap over the output works
        positions = (flat_targets != self.ignore_index).nonzero().squeeze(1)
        return losses.index_select(0, positions)

    # ------------------------------------------------------------------ closed-form Hessians
    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy Hessian w.r.t. the logits times each of the k ``vectors``
        (``(k, B, T, V)``), by the fused kernel; the shift and the mask stay inside it."""
        return self._ce_hessian_product(output, batch, vectors, overwrite=False)

    def output_hessian_vector_product_(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        """The same product written into ``vectors`` (the kernel's in-place mode: no second
        (k, B, T, V) buffer). A subclass with its own product (the fused head) keeps it."""
        own = type(self).output_hessian_vector_product
        if own is not TokenCrossEntropyLoss.output_hessian_vector_product:
            return self.output_hessian_vector_product(output, batch, vectors)
        return self._ce_hessian_product(output, batch, vectors, overwrite=True)

    def _ce_hessian_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor, *, overwrite: bool
    ) -> torch.Tensor:
        labels = self.labels(batch)
        self._check_logits(output, labels)
        return ce_hvp_columns(
            output,
            vectors,
            labels,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.fused,
            overwrite=overwrite,
        )

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        """MC Fisher: tokens drawn from each row's softmax (CPU generator), per valid row
        ``g <g, v> / n_valid`` with ``g = p - onehot(sample)``, averaged over ``mc_samples``."""
        targets = self.targets(batch)
        self._check_logits(output, targets)
        valid = targets != self.ignore_index
        scale = 1.0 / max(int(valid.sum()), 1)
        return closed_form.softmax_ce_rows_sampled_hvp(
            output.detach(), vectors, valid, scale, generator, mc_samples
        )


def ce_hvp_columns(
    logits: torch.Tensor,
    vectors: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    backend: str,
    overwrite: bool = False,
) -> torch.Tensor:
    """``ce_hvp`` (mean reduction) applied to each of the k columns of ``vectors``
    (``(k, *logits.shape)``); returns ``(k, *logits.shape)``. ``overwrite``: the result goes
    into ``vectors`` (returned) when their dtype can hold it."""
    logits = logits.detach()
    result_dtype = torch.promote_types(logits.dtype, vectors.dtype)
    in_place = overwrite and vectors.dtype == result_dtype and not vectors.requires_grad
    result = (
        vectors
        if in_place
        else torch.empty(vectors.shape, dtype=result_dtype, device=logits.device)
    )
    for j in range(vectors.shape[0]):  # each column written into its slot: no stacked copy
        ce_hvp(
            logits,
            vectors[j],
            labels,
            ignore_index=ignore_index,
            shift=shift,
            reduction="mean",
            backend=backend,
            out=None if in_place else result[j],
            inplace=in_place,
        )
    return result.to(vectors.dtype)


# ---------------------------------------------------------------------------- HF causal LMs
_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch")


def hf_model_inputs(batch: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for the model: the batch without its labels, and no KV cache for HF
    models (``use_cache=False``: a product never decodes)."""
    inputs = {key: value for key, value in batch.items() if key not in _NOT_MODEL_INPUTS}
    if hasattr(getattr(model, "config", None), "use_cache"):
        inputs.setdefault("use_cache", False)
    return inputs


class HFCausalLMLoss(TokenCrossEntropyLoss):
    """HF causal-LM cross-entropy on dict / ``BatchEncoding`` batches with ``input_ids``,
    optional ``attention_mask`` and optional ``labels``.

    Without ``labels`` the labels are ``input_ids`` with padding (``attention_mask == 0``) set
    to ``ignore_index``; given ``labels`` are used as they are, as HF does. The loss equals
    ``model(**batch, labels=labels).loss``.
    """

    shift = True
    helper_name = "hf_lm_loss"

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "input_ids")
        return logits_of(model(**hf_model_inputs(mapping, model)))

    def labels(self, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "input_ids")
        input_ids = mapping["input_ids"]
        labels = mapping.get("labels")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"{self.helper_name}: labels of shape {tuple(labels.shape)} do not match "
                    f"input_ids of shape {tuple(input_ids.shape)}"
                )
            return labels
        attention_mask = mapping.get("attention_mask")
        if attention_mask is None:
            return input_ids
        return input_ids.masked_fill(attention_mask == 0, self.ignore_index)


class _HFCausalLMLossOfOutput(HFCausalLMLoss):
    """``loss_of_output_fn(logits, batch)`` form of :class:`HFCausalLMLoss`; it carries the
    closed-form output Hessian, the token count and the per-token losses."""

    def __call__(self, output: torch.Tensor, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return self.loss(output, batch)


class _HFForward:
    """``forward_fn(model, batch)`` returning the logits of an HF model (labels dropped)."""

    def __init__(self, helper_name: str = "hf_lm_forward") -> None:
        self.helper_name = helper_name

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "input_ids")
        return logits_of(model(**hf_model_inputs(mapping, model)))


def hf_lm_loss(
    *,
    fused: str = "auto",
    ignore_index: int = -100,
    fused_head: bool = False,
    head_tile: tuple[int, int] = (1024, 8192),
) -> HFCausalLMLoss:
    """Loss for HuggingFace causal LMs: shifted token cross-entropy, mean over valid targets.

    Example: ``GGNOperator(model, [tokenizer(texts, return_tensors="pt", padding=True)],
    hf_lm_loss())``. ``fused`` picks the CE Hessian backend of the GGN ("auto", "triton",
    "compile", "eager"). ``fused_head=True`` (models with a linear LM head) fuses the head with
    the CE Hessian so GGN and MC Fisher products never build the (N, V) logits; ``head_tile`` is
    its (rows, vocabulary) tile. Also callable as ``loss_fn(model, batch)`` (seed style).
    """
    if fused_head:
        from torch_linop.losses.fused_lm_head import HFFusedHeadLoss

        if not (isinstance(head_tile, tuple) and len(head_tile) == 2):
            raise ValueError(f"head_tile must be a (rows, vocab) pair of ints, got {head_tile!r}")
        check_fused(fused)
        return HFFusedHeadLoss(
            ignore_index=ignore_index, row_tile=head_tile[0], vocab_tile=head_tile[1]
        )
    return HFCausalLMLoss(fused=fused, ignore_index=ignore_index)


def hf_lm_forward() -> _HFForward:
    """Seed-compatible ``forward_fn`` for HF causal LMs: the logits, without HF's loss."""
    return _HFForward()


def hf_lm_loss_of_output(
    fused: str = "auto", *, ignore_index: int = -100
) -> _HFCausalLMLossOfOutput:
    """Seed-compatible ``loss_of_output_fn(logits, batch)``; it carries the closed-form CE
    Hessian, so ``GGNOperator(model, data, hf_lm_forward(), hf_lm_loss_of_output())`` uses it."""
    return _HFCausalLMLossOfOutput(fused=fused, ignore_index=ignore_index)


# ---------------------------------------------------------------------------- HF encoder-decoders
class HFSeq2SeqLoss(TokenCrossEntropyLoss):
    """Decoder cross-entropy of HF encoder-decoder models (T5, BART): batches with
    ``input_ids``, ``labels`` (not shifted: decoder position t predicts ``labels[:, t]``),
    optional ``attention_mask`` / ``decoder_attention_mask`` / ``decoder_input_ids``. Without
    ``decoder_input_ids`` the model makes them from the labels
    (``prepare_decoder_input_ids_from_labels``), as it does when it computes its own loss."""

    shift = False
    helper_name = "hf_seq2seq_loss"

    def labels(self, batch: Any) -> torch.Tensor:
        return as_mapping(batch, self.helper_name, "labels")["labels"]

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "labels")
        inputs = hf_model_inputs(mapping, model)
        if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None:
                raise TypeError(_not_seq2seq_message(model))
            inputs["decoder_input_ids"] = prepare(labels=mapping["labels"])
        return logits_of(model(**inputs))


def _not_seq2seq_message(model: nn.Module) -> str:
    """Why ``hf_seq2seq_loss`` cannot make decoder inputs for ``model``, and what to use."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "is_encoder_decoder", False):
        return (
            f"{name} is not an encoder-decoder model, and hf_seq2seq_loss is for encoder-"
            "decoders (T5, BART). For a masked LM (BERT-style, labels -100 where not masked) "
            "use hf_masked_lm_loss(); for a classifier whose output has .logits "
            "(...ForSequenceClassification, ViT) use hf_classification_loss(); for a causal "
            "LM use hf_lm_loss()"
        )
    return (
        f"{name} has no prepare_decoder_input_ids_from_labels(); put decoder_input_ids (the "
        "labels shifted right) in the batch"
    )


def hf_seq2seq_loss(*, fused: str = "auto", ignore_index: int = -100) -> HFSeq2SeqLoss:
    """Loss for HuggingFace encoder-decoder models: decoder token cross-entropy, mean over
    labels that are not ``ignore_index``; equals ``model(**batch).loss``."""
    return HFSeq2SeqLoss(fused=fused, ignore_index=ignore_index)
