"""Small collectives shared by the data-parallel and the sharded operators: where a collective's
buffer must live for the group's backend, and a non-finite check that every rank answers alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from torch_linop.data_parallel import comm_device

__all__ = ["check_finite_on_all_ranks", "comm_device"]


def check_finite_on_all_ranks(
    tensor: torch.Tensor, group: Any, message: str, error: type[Exception]
) -> None:
    """Raise ``error(message)`` on every rank of ``group`` if ``tensor`` holds a NaN or Inf on
    any rank: one all-reduced flag, so all ranks raise together (a rank that raised alone would
    leave the others waiting in their next collective). A collective: every rank calls it."""
    bad = torch.tensor(
        [float(not bool(torch.isfinite(tensor).all()))],
        dtype=torch.float64,
        device=comm_device(group, tensor.device),
    )
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if float(bad[0]) > 0:
        raise error(message)
