"""The vector space of an FSDP2-sharded operator: each rank holds its rows of every vector, and
reductions over the rows are local results summed by one collective.

This is what the solvers of ``torch_linop.solvers`` see through an operator's ``vector_space``
(their protocol, ``solvers._space.VectorSpace``): inner products, norms and the QR of a block
(TSQR) are reduced over the ranks, so every rank gets bitwise identical small results and takes
the same steps; probes are drawn for this rank's entries only, so no rank ever holds a full
vector, and a seed gives the probes it gives a single process.

Every method is a collective over ``group``: all ranks call it with their parts of the same block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from torch_linop.data_parallel import comm_device, consistent_seed


def local_rows(dim0: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 sharded tensor held by ``rank`` (``torch.chunk`` rule,
    which FSDP2 uses: ceil-sized chunks, trailing ranks may hold fewer or none)."""
    chunk = -(-dim0 // world) if dim0 else 0
    return min(rank * chunk, dim0), min((rank + 1) * chunk, dim0)


def sharded_entries(
    global_shapes: Sequence[tuple[int, ...]], world: int, rank: int
) -> list[tuple[int, int]]:
    """Entries ``[start, stop)`` of a full vector that ``rank`` holds, in the order of its part:
    for each parameter (flattened and concatenated), its rows under :func:`local_rows`."""
    ranges, offset = [], 0
    for shape in global_shapes:
        row_size = math.prod(int(dim) for dim in shape[1:])
        first, last = local_rows(int(shape[0]), world, rank)
        ranges.append((offset + first * row_size, offset + last * row_size))
        offset += int(shape[0]) * row_size
    return ranges


class ShardedSpace:
    """Vectors split by rows over the ranks of ``group``; this rank holds ``entries`` of them.

    ``device``: where this rank's rows live (collective buffers move to where the backend needs
    them: the CPU for gloo).
    """

    def __init__(
        self, group: Any, entries: Sequence[tuple[int, int]], device: torch.device | str
    ) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.entries = [(int(start), int(stop)) for start, stop in entries]
        self.device = torch.device(device)

    def __repr__(self) -> str:
        held = sum(stop - start for start, stop in self.entries)
        return f"<ShardedSpace rank {self.rank} of {self.world}, {held} entries held>"

    def __eq__(self, other: object) -> bool:
        """The same group and the same entries on this rank: vectors laid out alike."""
        return (
            isinstance(other, ShardedSpace)
            and other.group is self.group
            and other.entries == self.entries
        )

    def __hash__(self) -> int:
        return hash((ShardedSpace, id(self.group), tuple(self.entries)))

    @property
    def world_size(self) -> int:
        """Ranks sharing the vectors (what the solvers' checkpoints name their files by)."""
        return self.world

    def local_entries(self) -> list[tuple[int, int]]:
        return list(self.entries)

    def reduce(self, partial: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """``partial`` summed (or maximised) over the ranks, on ``partial``'s device."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        where = comm_device(self.group, self.device)
        buffer = partial.detach().to(where).clone(memory_format=torch.contiguous_format)
        dist.all_reduce(buffer, op=reduce_op, group=self.group)
        return buffer.to(partial.device)

    def inner(self, x: Tensor, y: Tensor) -> Tensor:
        """``x.T @ y`` over all rows of the sharded ``(n, i)`` and ``(n, j)`` blocks."""
        return self.reduce(x.T @ y, "sum")

    def shared_seed(self, seed: int | torch.Generator | None) -> int | torch.Generator | None:
        """None: one fresh seed drawn on the group's first rank and broadcast; a generator
        must be in the same state on every rank (ValueError otherwise)."""
        return consistent_seed(seed, self.group)

    def qr(self, block: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q, R)`` of the sharded ``(n, s)`` block by TSQR (Demmel et al. 2012): a local
        Householder QR per rank, one all-gather of the ``s x s`` triangular factors, and a QR of
        their stack, which every rank computes from the same numbers (so ``R`` is the same on
        every rank). As stable as Householder QR of the whole block; ranks holding fewer than
        ``s`` rows (or none) contribute fewer rows to the stack."""
        width = block.shape[1]
        local_q, local_r = torch.linalg.qr(block)  # (m, min(m, s)), (min(m, s), s)
        rows = local_r.shape[0]
        where = comm_device(self.group, self.device)
        padded = torch.zeros(width + 1, width, dtype=block.dtype, device=where)
        padded[:rows] = local_r.to(where)
        padded[width, 0] = rows  # the row count rides along (exact in any float for s < 2^24)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        counts = [int(part[width, 0]) for part in gathered]
        stacked = torch.cat([part[:count] for part, count in zip(gathered, counts)])
        if stacked.shape[0] < width:
            raise ValueError(
                f"the sharded block has {stacked.shape[0]} rows in all, fewer than its {width} "
                "columns: no orthonormal basis of that width exists"
            )
        stacked_q, triangular = torch.linalg.qr(stacked.to(torch.device("cpu")))
        offset = sum(counts[: self.rank])
        own_q = stacked_q[offset : offset + rows].to(block.device, block.dtype)
        return local_q @ own_q, triangular.to(block.device, block.dtype)
