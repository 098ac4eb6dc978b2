"""One curvature product rehearsed on the meta device: the library's own per-batch product code
(``HessianOperator`` / ``GGNOperator``) run on a meta copy of a HuggingFace causal LM, with the
live bytes counted (:mod:`torch_linop.planning.live_bytes`). Nothing is materialised, so the
same code measures a 2-layer toy and one layer of a 70B model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torch_linop.planning.live_bytes import LiveBytes

CURVATURES = ("hessian", "ggn")


@dataclass(frozen=True)
class Rehearsal:
    """Bytes of one product on one micro-batch, above the parameters and the input vector.

    ``peak``: the largest total of storages the product created (activations, the gradient
    graph, dual tensors, the result and its concatenation); ``logits_at_peak``: how much of it
    were vocabulary-sized tensors (the cross-entropy middle); ``num_params``: entries of the
    vector.
    """

    peak: int
    logits_at_peak: int
    num_params: int


def meta_model(config: Any, dtype: torch.dtype) -> Any:
    """``LlamaForCausalLM`` (or any ``AutoModelForCausalLM`` config) built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def rehearse(
    config: Any, curvature: str, *, micro_batch: int, seq_len: int, dtype: torch.dtype
) -> Rehearsal:
    """Live bytes of one ``curvature`` product of the model of ``config`` on ``micro_batch``
    sequences of ``seq_len`` tokens, exactly as ``op @ v`` runs it (one column, one batch)."""
    from torch_linop.ggn import GGNOperator
    from torch_linop.hessian import HessianOperator
    from torch_linop.losses.language_models import hf_lm_loss

    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    model = meta_model(config, dtype)
    batch = {"input_ids": torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")}
    operator_class = HessianOperator if curvature == "hessian" else GGNOperator
    operator = operator_class(model, [batch], hf_lm_loss())
    num_params = operator.shape[0]
    vocab = config.vocab_size
    vector = torch.empty(num_params, 1, dtype=dtype, device="meta")
    with LiveBytes() as counter:
        counter.watch("logits", lambda tensor: tensor.dim() >= 2 and tensor.shape[-1] == vocab)
        tangents = operator._split_columns(vector)
        with operator._product_context():
            pieces = operator.batch_product(batch, tangents)
        with torch.no_grad():  # as CurvatureOperator._apply joins the per-parameter products
            joined = torch.cat([piece.reshape(1, -1) for piece in pieces], dim=1).T
        del pieces, joined
    return Rehearsal(
        peak=counter.peak,
        logits_at_peak=counter.tags_at_peak.get("logits", 0),
        num_params=num_params,
    )
