"""The layout every Kronecker operator shares: a vector of the selected parameters, cut into
per-layer blocks, each multiplied by that layer's structured matrix.

A weight block is the weight flattened to ``(out_features, in_features)`` (row-major, as the
parameter vector holds it; Hugging Face's Conv1D stores ``W^T`` and is transposed in and out),
so a Kronecker product ``G kron A`` acts as ``G @ W @ A``. With a joined bias the block is
``[W | b]`` of shape ``(out_features, in_features + 1)``. Subclasses say how one layer's weight
(or joined) block and bias block are multiplied.
"""

from __future__ import annotations

import torch

from torch_linop.kfac.layers import KFACLayer
from torch_linop.linear_operator import TorchLinearOperator


class KroneckerBlockOperator(TorchLinearOperator):
    """Block-diagonal symmetric operator over :class:`KFACLayer` blocks (see the module doc);
    the torch, numpy and algebra paths come from :class:`TorchLinearOperator`."""

    is_symmetric = True

    layers: list[KFACLayer]
    param_names: list[str]
    param_shapes: list[torch.Size]
    separate_weight_and_bias: bool

    def _init_layout(
        self,
        layers: list[KFACLayer],
        names: list[str],
        shapes: list[torch.Size],
        separate_weight_and_bias: bool,
        torch_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.param_names = names
        self.param_shapes = shapes
        self.separate_weight_and_bias = separate_weight_and_bias
        self._sizes = [int(torch.Size(shape).numel()) for shape in shapes]
        dim = sum(self._sizes)
        TorchLinearOperator.__init__(self, (dim, dim), torch_dtype, device)

    def joins_bias(self, layer: KFACLayer) -> bool:
        """Weight and bias of ``layer`` form one ``[W | b]`` block."""
        return (
            not self.separate_weight_and_bias
            and layer.weight_index is not None
            and layer.bias_index is not None
        )

    # ------------------------------------------------------------------ hooks
    def _weight_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        """The layer's matrix times a weight (or joined) block ``(out, in[+1], k)``."""
        raise NotImplementedError

    def _bias_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        """The layer's matrix times a separate bias block ``(out, k)``."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Compute what the products need (factors, eigenbases) if not done yet."""

    # ------------------------------------------------------------------ product
    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        self._prepare()
        columns = X.shape[1]
        blocks = list(X.split(self._sizes))
        result = torch.empty_like(X)
        outputs = list(result.split(self._sizes))
        for layer in self.layers:
            w, b = layer.weight_index, layer.bias_index
            weight = None if w is None else self._weight_block(layer, blocks[w], columns)
            if self.joins_bias(layer):
                assert w is not None and b is not None and weight is not None
                joined = torch.cat([weight, blocks[b].unsqueeze(1)], dim=1)
                product = self._weight_product(layer, joined)
                outputs[w].copy_(self._weight_columns(layer, product[:, :-1], columns))
                outputs[b].copy_(product[:, -1])
                continue
            if w is not None and weight is not None:
                product = self._weight_product(layer, weight)
                outputs[w].copy_(self._weight_columns(layer, product, columns))
            if b is not None:
                outputs[b].copy_(self._bias_product(layer, blocks[b]))
        return result

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _weight_block(layer: KFACLayer, columns_of_weight: torch.Tensor, columns: int):
        """A weight's ``(size, k)`` columns as ``(out, in, k)`` blocks."""
        if layer.weight_transposed:
            return columns_of_weight.reshape(
                layer.in_features, layer.out_features, columns
            ).transpose(0, 1)
        return columns_of_weight.reshape(layer.out_features, -1, columns)

    @staticmethod
    def _weight_columns(layer: KFACLayer, block: torch.Tensor, columns: int) -> torch.Tensor:
        """``(out, in, k)`` back to the parameter's ``(size, k)`` layout."""
        if layer.weight_transposed:
            block = block.transpose(0, 1)
        return block.reshape(-1, columns)

    def block_shapes(self, layer: KFACLayer) -> list[tuple[str, int, int]]:
        """``(kind, rows, cols)`` of each block of ``layer``: kind ``"joined"``, ``"weight"``
        or ``"bias"`` (cols 1)."""
        if self.joins_bias(layer):
            return [("joined", layer.out_features, layer.in_features + 1)]
        shapes = []
        if layer.weight_index is not None:
            shapes.append(("weight", layer.out_features, layer.in_features))
        if layer.bias_index is not None:
            shapes.append(("bias", layer.out_features, 1))
        return shapes
