"""Data-parallel KFAC: each rank walks its own shard, then one all-reduce sums what it found.

Counts (samples, loss rows) are summed before the factor pass (the rows' loss weights need the
global count); the factors, or EKFAC's corrected eigenvalues, are summed once after it, packed
into one buffer. ``process_group`` follows the exact operators' rule (see
:func:`torch_linop.data_parallel.check_process_group`): None uses the default group
when one is initialised, False never reduces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from torch_linop import data_parallel
from torch_linop.distributed._collectives import comm_device


def sum_counts(process_group: Any, device: torch.device, counts: list[int]) -> list[int]:
    """``counts`` summed over the ranks (unchanged without a reduction)."""
    spec = data_parallel.resolve(process_group)
    if spec is None:
        return counts
    buffer = torch.tensor(counts, dtype=torch.int64, device=comm_device(spec.group, device))
    dist.all_reduce(buffer, group=spec.group)
    return [int(value) for value in buffer.tolist()]


def sum_tensors(process_group: Any, tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks in place, with one all-reduce of a packed buffer. Every
    rank must pass tensors of the same shapes in the same order."""
    spec = data_parallel.resolve(process_group)
    if spec is None or not tensors:
        return
    device = tensors[0].device
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    flat = flat.to(comm_device(spec.group, device))
    dist.all_reduce(flat, group=spec.group)
    for tensor, part in zip(tensors, flat.to(device).split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))
