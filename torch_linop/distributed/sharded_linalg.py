"""Linear algebra on sharded vectors: each rank holds its rows of an ``(n, k)`` block (its part
of every column), reductions over the rows are local results summed by one collective.

Every function here is a collective over ``op.group``: all ranks call it with their parts of the
same block, and all get bitwise identical small results (reduced scalars, Gram matrices, the
TSQR factor), so solvers built on them take the same steps on every rank.

``op`` is a sharded operator (``ShardedOperator``): ``group``, ``world``, ``rank``,
``local_size``, ``shape``, ``global_shapes``, ``device`` and ``torch_dtype``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torch_linop.distributed._collectives import comm_device
from torch_linop.distributed.fsdp import local_rows
from torch_linop.solvers import _random

Distribution = _random.Distribution


def _comm_device(op: Any) -> torch.device:
    """Where collective buffers live for ``op``'s group (the CPU for gloo)."""
    return comm_device(op.group, torch.device(op.device))


def all_reduce(op: Any, local: Tensor, reduce_op: Any = dist.ReduceOp.SUM) -> Tensor:
    """``local`` reduced over the ranks (sum by default), returned on ``local``'s device."""
    buffer = local.detach().to(_comm_device(op), copy=True).contiguous()
    dist.all_reduce(buffer, op=reduce_op, group=op.group)
    return buffer.to(local.device)


def dot(op: Any, a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` over all rows of the sharded ``(n, i)`` and ``(n, j)`` blocks."""
    return all_reduce(op, a.T @ b)


def column_sums(op: Any, block: Tensor) -> Tensor:
    """Sums over all rows of each column of the sharded ``(n, k)`` block."""
    return all_reduce(op, block.sum(dim=0))


def max_abs(op: Any, block: Tensor) -> Tensor:
    """``max |block|`` over all ranks (0 for empty blocks), a 0-d tensor."""
    local = block.abs().max() if block.numel() else torch.zeros((), dtype=block.dtype)
    return all_reduce(op, local.to(block.device), dist.ReduceOp.MAX)


def local_ranges(op: Any) -> list[tuple[int, int]]:
    """Entries ``[start, stop)`` of a full vector that this rank holds, in the order of its part:
    for each parameter, its rows ``local_rows(...)`` (the ``torch.chunk`` rule of FSDP2)."""
    ranges, offset = [], 0
    for shape in op.global_shapes:
        row_size = math.prod(int(dim) for dim in shape[1:])
        first, last = local_rows(int(shape[0]), op.world, op.rank)
        ranges.append((offset + first * row_size, offset + last * row_size))
        offset += int(shape[0]) * row_size
    return ranges


def local_probes(
    op: Any, count: int, generator: torch.Generator, distribution: Distribution, dtype: torch.dtype
) -> Tensor:
    """This rank's rows of the next ``count`` probes of ``generator``: exactly the probes that
    ``torch_linop.solvers`` draws from the same generator state (``draw_probes``: one key per
    probe from the generator, entry ``i`` a hash of ``(key, i)``), generated on the device for
    this rank's entries only, so no rank ever makes a full probe."""
    columns = torch.empty(op.local_size, count, dtype=dtype, device=op.device)
    ranges = local_ranges(op)
    for column in range(count):
        key = _random.draw_key(generator)
        position = 0
        for start, stop in ranges:
            for first in range(start, stop, _random._CHUNK_ELEMENTS):
                last = min(stop, first + _random._CHUNK_ELEMENTS)
                columns[position : position + last - first, column] = _random.probe_entries(
                    key, first, last, distribution=distribution, dtype=dtype, device=op.device
                )
                position += last - first
    return columns


def skip_probes(generator: torch.Generator, count: int) -> None:
    """Advance ``generator`` past ``count`` probes, as drawing them would (one key each)."""
    for _ in range(count):
        _random.draw_key(generator)


def tall_skinny_qr(op: Any, block: Tensor) -> Tensor:
    """Orthonormal basis ``Q`` (this rank's rows, ``(local_size, s)``) of the sharded ``(n, s)``
    block, by TSQR (Demmel et al. 2012): a local Householder QR per rank, one all-gather of the
    ``s x s`` triangular factors, and a QR of their stack, which every rank computes from the same
    numbers. As stable as Householder QR of the whole block; ranks holding fewer than ``s`` rows
    (or none) contribute fewer rows to the stack."""
    width = block.shape[1]
    local_q, local_r = torch.linalg.qr(block)  # (m, min(m, s)), (min(m, s), s)
    rows = local_r.shape[0]
    padded = torch.zeros(width + 1, width, dtype=block.dtype, device=_comm_device(op))
    padded[:rows] = local_r.to(padded.device)
    padded[width, 0] = rows  # the row count rides along (exact in any float dtype for s < 2^24)
    gathered = [torch.empty_like(padded) for _ in range(op.world)]
    dist.all_gather(gathered, padded, group=op.group)
    counts = [int(part[width, 0]) for part in gathered]
    stacked = torch.cat([part[:count] for part, count in zip(gathered, counts)])
    if stacked.shape[0] < width:
        raise ValueError(
            f"the sharded block has {stacked.shape[0]} rows in all, fewer than its {width} "
            "columns: no orthonormal basis of that width exists"
        )
    stacked_q, _ = torch.linalg.qr(stacked.to(torch.device("cpu")))
    offset = sum(counts[: op.rank])
    return local_q @ stacked_q[offset : offset + rows].to(block.device, block.dtype)
