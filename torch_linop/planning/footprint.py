"""Product memory as a function of depth and micro-batch, from four meta rehearsals.

A decoder-only LM's product workspace is, to within a few percent, bilinear in the number of
layers ``L`` and the sequences per micro-batch ``b``: ``a + b_L L + c b + d L b`` (parameter-sized
buffers grow with ``L``; activations with ``L b``; the embedding, head and cross-entropy middle with
``b``). Rehearsing 1- and 2-layer copies at ``b = 1, 2`` fixes the four numbers, so a 70B model
is planned from two of its layers in about a second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from torch_linop.planning.rehearsal import rehearse


@dataclass(frozen=True)
class Footprint:
    """Product bytes above parameters and input vector; see :meth:`workspace`."""

    constant: int
    per_layer: int
    per_sequence: int
    per_layer_sequence: int
    logits_per_sequence: int

    def workspace(self, num_layers: int, micro_batch: int) -> int:
        """Peak bytes of one product on ``micro_batch`` sequences."""
        return (
            self.constant
            + self.per_layer * num_layers
            + (self.per_sequence + self.per_layer_sequence * num_layers) * micro_batch
        )

    def parameter_sized(self, num_layers: int) -> int:
        """The part that does not grow with tokens (gradients, the result): sharded by FSDP2."""
        return max(0, self.constant + self.per_layer * num_layers)

    def token_sized(self, num_layers: int, micro_batch: int) -> int:
        """The part that grows with tokens (activations, graphs, logits): per rank, unsharded."""
        return max(0, (self.per_sequence + self.per_layer_sequence * num_layers) * micro_batch)


_FITTED: dict[tuple[str, str, int, torch.dtype], Footprint] = {}


def footprint(config: Any, curvature: str, *, seq_len: int, dtype: torch.dtype) -> Footprint:
    """Fit :class:`Footprint` for ``config``'s architecture from rehearsals of 1 and 2 layers
    (remembered per config, curvature, sequence length and dtype for the process's life)."""
    key = (config.to_json_string(use_diff=False), curvature, seq_len, dtype)
    if key not in _FITTED:
        _FITTED[key] = _fit(config, curvature, seq_len=seq_len, dtype=dtype)
    return _FITTED[key]


def _fit(config: Any, curvature: str, *, seq_len: int, dtype: torch.dtype) -> Footprint:
    peaks: dict[tuple[int, int], int] = {}
    logits: dict[int, int] = {}
    for num_layers in (1, 2):
        shallow = copy.deepcopy(config)
        shallow.num_hidden_layers = num_layers
        if hasattr(shallow, "layer_types") and shallow.layer_types is not None:
            shallow.layer_types = shallow.layer_types[:num_layers]
        for micro_batch in (1, 2):
            result = rehearse(
                shallow, curvature, micro_batch=micro_batch, seq_len=seq_len, dtype=dtype
            )
            peaks[num_layers, micro_batch] = result.peak
            logits[micro_batch] = result.logits_at_peak
    per_layer_sequence = peaks[2, 2] - peaks[2, 1] - peaks[1, 2] + peaks[1, 1]
    per_sequence = peaks[1, 2] - peaks[1, 1] - per_layer_sequence
    per_layer = peaks[2, 1] - peaks[1, 1] - per_layer_sequence
    constant = peaks[1, 1] - per_layer - per_sequence - per_layer_sequence
    return Footprint(
        constant=constant,
        per_layer=per_layer,
        per_sequence=per_sequence,
        per_layer_sequence=per_layer_sequence,
        logits_per_sequence=max(logits[1], logits[2] - logits[1]),
    )
