"""GGN products of HF causal LMs that never materialise the (N, V) logits: the LM head and the
cross-entropy Hessian are fused and computed tile by tile from the hidden states and the
unembedding (see docs/concepts/fused_lm_head.md).

The loss's "output" is the packed vector ``[h, W, b]`` (final hidden states, LM-head weight and
bias) instead of the logits ``z = h W^T + b``. With ``J_z = J_head J_packed`` the GGN is
``J_packed^T (J_head^T H_z J_head) J_packed``: forward-mode AD gives the packed tangent
``[dh, dW, db]``, the middle factor below maps it to ``[g_h, g_W, g_b]`` over (rows x vocab)
tiles, and one VJP of the packed output sends ``g_h`` through the body and ``g_W`` to the head
weight (and through the embedding when it is tied). Peak extra memory: O((N + V) d) plus one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.losses.language_models import HFCausalLMLoss, as_mapping, hf_model_inputs

# config attributes of HF models whose logits are not lm_head(last_hidden_state)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


@dataclass(frozen=True)
class HeadLayout:
    """Where the hidden states, weight and bias sit in the packed output vector."""

    batch_shape: tuple[int, int]  # (B, T)
    hidden_size: int  # d
    vocab_size: int  # V
    has_bias: bool

    @property
    def num_rows(self) -> int:
        return self.batch_shape[0] * self.batch_shape[1]

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(..., P)`` -> hidden ``(..., N, d)``, weight ``(..., V, d)``, bias ``(..., V)``."""
        lead = packed.shape[:-1]
        n, d, v = self.num_rows, self.hidden_size, self.vocab_size
        hidden = packed[..., : n * d].reshape(*lead, n, d)
        weight = packed[..., n * d : n * d + v * d].reshape(*lead, v, d)
        bias = packed[..., n * d + v * d :] if self.has_bias else None
        return hidden, weight, bias


def _linear_head(model: nn.Module) -> nn.Linear:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"hf_lm_loss(fused_head=True) needs an HF causal LM whose get_output_embeddings() is "
            f"an nn.Linear, got {type(head).__name__} from {type(model).__name__}; use "
            "hf_lm_loss() (materialised logits) for this model"
        )
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits after the LM head "
                f"(config.{name}={value!r}), which the fused head does not reproduce; use "
                "hf_lm_loss() (materialised logits)"
            )
    return head


class HFFusedHeadLoss(HFCausalLMLoss):
    """:class:`HFCausalLMLoss` whose forward returns the packed ``[h, W, b]`` instead of the
    logits, with a tiled closed-form GGN middle factor and MC Fisher sampler.

    ``loss`` and ``per_sample_losses`` (Hessian, empirical Fisher) still build the logits. The
    packed output's Hessian is not the GGN's middle factor (the head is bilinear), so use
    :func:`torch_linop.reference.dense_ggn` with the plain ``hf_lm_loss()``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        row_tile: int = 1024,
        vocab_tile: int = 8192,
    ) -> None:
        super().__init__(fused="eager", ignore_index=ignore_index)
        for name, value in (("row_tile", row_tile), ("vocab_tile", vocab_tile)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.row_tile = row_tile
        self.vocab_tile = vocab_tile
        self._layout: HeadLayout | None = None

    # ------------------------------------------------------------------ forward: packed output
    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        mapping = as_mapping(batch, self.helper_name, "input_ids")
        head = _linear_head(model)
        body = getattr(model, "base_model", None)
        if not isinstance(body, nn.Module) or body is model:
            raise TypeError(
                f"{type(model).__name__} has no separate base model to produce hidden states; "
                "use hf_lm_loss() (materialised logits)"
            )
        hidden = body(**hf_model_inputs(mapping, body)).last_hidden_state
        weight, bias = head.weight, head.bias
        self._layout = HeadLayout(
            batch_shape=(int(hidden.shape[0]), int(hidden.shape[1])),
            hidden_size=int(weight.shape[1]),
            vocab_size=int(weight.shape[0]),
            has_bias=bias is not None,
        )
        parts = [hidden.reshape(-1), weight.reshape(-1)]
        if bias is not None:
            parts.append(bias.reshape(-1))
        return torch.cat(parts)

    def layout(self, output: torch.Tensor, batch: Any) -> HeadLayout:
        """The layout of the packed ``output`` of ``batch``, checked against its size."""
        layout = self._layout
        labels = self.labels(batch)
        if layout is None or layout.batch_shape != tuple(labels.shape):
            raise RuntimeError(
                "the fused-head loss got a packed output it did not produce: call its forward() "
                "on this batch first (operators do)"
            )
        expected = layout.num_rows * layout.hidden_size + layout.vocab_size * layout.hidden_size
        expected += layout.vocab_size if layout.has_bias else 0
        if output.shape[-1] != expected:
            raise ValueError(
                f"packed output has {output.shape[-1]} entries, expected {expected} for {layout}"
            )
        return layout

    def logits(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Materialised (B, T, V) logits of a packed output (loss values, Hessian, EF only)."""
        layout = self.layout(output, batch)
        hidden, weight, bias = layout.split(output)
        logits = F.linear(hidden, weight, bias)
        return logits.reshape(*layout.batch_shape, layout.vocab_size)

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return super().loss(self.logits(output, batch), batch)

    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return super().per_sample_losses(self.logits(output, batch), batch)

    # ------------------------------------------------------------------ tiled middle factors
    def _valid_rows_and_scale(self, batch: Any) -> tuple[torch.Tensor, float]:
        valid = (self.targets(batch) != self.ignore_index).reshape(-1)
        return valid, 1.0 / max(int(valid.sum()), 1)

    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor:
        """``J_head^T H_z J_head`` times packed tangents ``(k, P)``, tile by tile."""
        layout = self.layout(output, batch)
        valid, scale = self._valid_rows_and_scale(batch)
        return fused_head_ggn_product(
            output.detach(),
            vectors,
            layout,
            valid,
            scale,
            row_tile=self.row_tile,
            vocab_tile=self.vocab_tile,
        )

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        """MC Fisher with the same draws as the unfused loss (uniforms for all rows drawn first,
        in the same order), over row tiles with the full vocabulary per tile."""
        layout = self.layout(output, batch)
        valid, scale = self._valid_rows_and_scale(batch)
        uniforms = torch.stack(
            [
                torch.rand(layout.batch_shape, generator=generator, dtype=torch.float32)
                for _ in range(mc_samples)
            ]
        ).reshape(mc_samples, -1)
        return fused_head_sampled_product(
            output.detach(), vectors, layout, valid, scale, uniforms, row_tile=self.row_tile
        )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_as(
    layout: HeadLayout, packed: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``layout.split`` with every part in the accumulation ``dtype``."""
    hidden, weight, bias = layout.split(packed)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _tangent_logits(
    hidden_tile: torch.Tensor,
    hidden_tangent_tile: torch.Tensor,
    weight_tile: torch.Tensor,
    weight_tangent_tile: torch.Tensor,
    bias_tangent_tile: torch.Tensor | None,
) -> torch.Tensor:
    """``dz = dh W^T + h dW^T (+ db)`` on one tile: ``(k, R, C)``."""
    tangent = hidden_tangent_tile @ weight_tile.T + hidden_tile @ weight_tangent_tile.transpose(
        1, 2
    )
    if bias_tangent_tile is not None:
        tangent = tangent + bias_tangent_tile.unsqueeze(1)
    return tangent


def fused_head_ggn_product(
    packed: torch.Tensor,
    vectors: torch.Tensor,
    layout: HeadLayout,
    valid_rows: torch.Tensor,
    scale: float,
    *,
    row_tile: int,
    vocab_tile: int,
) -> torch.Tensor:
    """Packed ``[g_h, g_W, g_b]`` for packed tangents ``vectors`` ``(k, P)``.

    Per row tile, pass 1 runs an online softmax over vocabulary tiles carrying the running max,
    the normaliser and ``<exp(z - max), dz>``; pass 2 recomputes ``z`` and ``dz`` per tile, forms
    ``r = p (dz - <p, dz>) * scale`` and accumulates ``g_h += r W``, ``g_W += r^T h``,
    ``g_b += sum_rows r``. No tensor larger than ``k x row_tile x vocab_tile`` is made.
    """
    acc = _accumulation_dtype(packed.dtype)
    with torch.no_grad():
        hidden, weight, bias = _split_as(layout, packed, acc)
        d_hidden, d_weight, d_bias = _split_as(layout, vectors, acc)
        num_columns = vectors.shape[0]
        g_hidden = torch.zeros_like(d_hidden)
        g_weight = torch.zeros_like(d_weight)
        g_bias = torch.zeros_like(d_bias) if d_bias is not None else None
        num_rows, vocab = layout.num_rows, layout.vocab_size
        row_weights = valid_rows.to(acc) * scale
        vocab_slices = [slice(c, min(c + vocab_tile, vocab)) for c in range(0, vocab, vocab_tile)]
        for start in range(0, num_rows, row_tile):
            rows = slice(start, min(start + row_tile, num_rows))
            if not bool(valid_rows[rows].any()):
                continue
            h_rows, dh_rows = hidden[rows], d_hidden[:, rows]
            num = rows.stop - rows.start
            running_max = torch.full((num,), -math.inf, dtype=acc, device=packed.device)
            normaliser = torch.zeros((num,), dtype=acc, device=packed.device)
            weighted = torch.zeros((num_columns, num), dtype=acc, device=packed.device)

            def tile(cols: slice, h_rows=h_rows, dh_rows=dh_rows):
                logits = h_rows @ weight[cols].T
                if bias is not None:
                    logits = logits + bias[cols]
                tangent = _tangent_logits(
                    h_rows,
                    dh_rows,
                    weight[cols],
                    d_weight[:, cols],
                    None if d_bias is None else d_bias[:, cols],
                )
                return logits, tangent

            for cols in vocab_slices:  # pass 1: online softmax statistics and <p, dz>
                logits, tangent = tile(cols)
                new_max = torch.maximum(running_max, logits.max(dim=1).values)
                rescale = torch.exp(running_max - new_max)
                exps = torch.exp(logits - new_max.unsqueeze(1))
                normaliser = normaliser * rescale + exps.sum(dim=1)
                weighted = weighted * rescale + (exps * tangent).sum(dim=2)
                running_max = new_max
            log_normaliser = running_max + torch.log(normaliser)
            inner = weighted / normaliser  # <p, dz> per column and row
            factor = row_weights[rows]
            for cols in vocab_slices:  # pass 2: r = p (dz - <p, dz>) scale, backpropagated
                logits, tangent = tile(cols)
                probs = torch.exp(logits - log_normaliser.unsqueeze(1))
                r = probs * (tangent - inner.unsqueeze(2)) * factor.view(1, -1, 1)
                g_hidden[:, rows] += r @ weight[cols]
                g_weight[:, cols] += r.transpose(1, 2) @ h_rows
                if g_bias is not None:
                    g_bias[:, cols] += r.sum(dim=1)
        parts = [g_hidden.reshape(num_columns, -1), g_weight.reshape(num_columns, -1)]
        if g_bias is not None:
            parts.append(g_bias)
        return torch.cat(parts, dim=1).to(vectors.dtype)


def fused_head_sampled_product(
    packed: torch.Tensor,
    vectors: torch.Tensor,
    layout: HeadLayout,
    valid_rows: torch.Tensor,
    scale: float,
    uniforms: torch.Tensor,
    *,
    row_tile: int,
) -> torch.Tensor:
    """MC Fisher ``J_head^T (1/M sum_m g_m g_m^T) J_head`` times packed tangents, with
    ``g_m = p - onehot(c_m)`` and ``c_m`` drawn by inverse CDF from ``uniforms`` ``(M, N)``;
    row tiles with the full vocabulary (``row_tile x V`` per tile)."""
    acc = _accumulation_dtype(packed.dtype)
    mc_samples = uniforms.shape[0]
    with torch.no_grad():
        hidden, weight, bias = _split_as(layout, packed, acc)
        d_hidden, d_weight, d_bias = _split_as(layout, vectors, acc)
        num_columns = vectors.shape[0]
        g_hidden = torch.zeros_like(d_hidden)
        g_weight = torch.zeros_like(d_weight)
        g_bias = torch.zeros_like(d_bias) if d_bias is not None else None
        row_weights = valid_rows.to(acc) * (scale / mc_samples)
        uniforms = uniforms.to(packed.device, acc)
        for start in range(0, layout.num_rows, row_tile):
            rows = slice(start, min(start + row_tile, layout.num_rows))
            if not bool(valid_rows[rows].any()):
                continue
            h_rows = hidden[rows]
            logits = F.linear(h_rows, weight, bias)
            probs = torch.softmax(logits, dim=-1)
            cumulative = probs.cumsum(dim=-1)
            tangent = _tangent_logits(h_rows, d_hidden[:, rows], weight, d_weight, d_bias)
            r = torch.zeros_like(tangent)
            for sample in range(mc_samples):
                targets = uniforms[sample, rows] * cumulative[:, -1]
                classes = torch.searchsorted(cumulative, targets.unsqueeze(1))
                classes = classes.clamp_(max=layout.vocab_size - 1)
                gradient = probs.clone()
                gradient.scatter_add_(1, classes, -torch.ones_like(classes, dtype=acc))
                r += gradient * (tangent * gradient).sum(dim=2, keepdim=True)
            r *= row_weights[rows].view(1, -1, 1)
            g_hidden[:, rows] += r @ weight
            g_weight += r.transpose(1, 2) @ h_rows
            if g_bias is not None:
                g_bias += r.sum(dim=1)
        parts = [g_hidden.reshape(num_columns, -1), g_weight.reshape(num_columns, -1)]
        if g_bias is not None:
            parts.append(g_bias)
        return torch.cat(parts, dim=1).to(vectors.dtype)
