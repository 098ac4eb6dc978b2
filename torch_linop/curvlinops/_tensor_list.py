"""curvlinops' tensor-list format: a vector as ``[t_1, ..., t_k]`` shaped like the parameters, a
matrix with one trailing column axis ``[(*s_1, K), ..., (*s_k, K)]``; converted to and from the
flat ``(n,)`` / ``(n, K)`` tensors our operators multiply."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def list_to_flat(
    tensors: Sequence[torch.Tensor], shapes: Sequence[torch.Size]
) -> tuple[torch.Tensor, bool]:
    """Flat ``(n,)`` (a vector) or ``(n, K)`` (a matrix) tensor, and whether it is a vector."""
    if len(tensors) != len(shapes):
        raise ValueError(f"List must contain {len(shapes)} tensors. Got {len(tensors)}.")
    if all(tensor.shape == shape for tensor, shape in zip(tensors, shapes)):
        return torch.cat([tensor.reshape(-1) for tensor in tensors]), True
    trailing = {tensor.shape[-1] for tensor in tensors if tensor.dim() > 0}
    matrix = len(trailing) == 1 and all(
        tensor.dim() == len(shape) + 1 and tensor.shape[:-1] == shape
        for tensor, shape in zip(tensors, shapes)
    )
    if not matrix:
        raise ValueError(
            f"Input list must contain tensors with shapes {[tuple(s) for s in shapes]} and an "
            f"optional trailing dimension for the matrix columns. Got "
            f"{[tuple(t.shape) for t in tensors]}."
        )
    (columns,) = trailing
    return torch.cat([tensor.reshape(-1, columns) for tensor in tensors]), False


def flat_to_list(
    flat: torch.Tensor, shapes: Sequence[torch.Size], is_vector: bool
) -> list[torch.Tensor]:
    """Inverse of :func:`list_to_flat` for the output space ``shapes``."""
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    chunks = torch.split(flat, sizes, dim=0)
    if is_vector:
        return [chunk.reshape(shape) for chunk, shape in zip(chunks, shapes)]
    return [chunk.reshape(*shape, flat.shape[1]) for chunk, shape in zip(chunks, shapes)]
