"""Rank-consistent seeds: ``seed=None`` in a distributed run means one fresh seed for all ranks.

A solver draws its probes from its seed. With ``seed=None`` every rank would draw its own
entropy, multiply different vectors, and either hang (ranks leave loops at different steps) or
silently mix the vectors in the all-reduced product. :func:`rank_consistent_seed` replaces
``None`` by a seed drawn on the group's first rank and broadcast, but only for operators that
reduce over ranks; everything else keeps its seed untouched (no collective runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from torch_linop.distributed.data_parallel import resolve, same_on_all_ranks, shared_seed


def operator_group(op: Any) -> tuple[bool, Any]:
    """``(distributed, group)``: whether ``op``'s products involve other ranks, and over which
    process group (None: the default group). Data-parallel operators (``process_group``) and
    FSDP2-sharded operators (``group`` and ``world``) are recognised; anything else is local."""
    if not (dist.is_available() and dist.is_initialized()):
        return False, None
    if hasattr(op, "process_group"):
        spec = resolve(op.process_group)
        return (False, None) if spec is None else (True, spec.group)
    if hasattr(op, "group") and int(getattr(op, "world", 1)) > 1:
        return True, op.group
    return False, None


def rank_consistent_seed(
    seed: int | torch.Generator | None, op: Any
) -> int | torch.Generator | None:
    """``seed``, except that ``None`` becomes :func:`shared_seed` of ``op``'s process group when
    ``op`` is distributed (a collective: every rank of the group must call it, as they call the
    solver). A ``torch.Generator`` on a distributed operator must be in the same state on every
    rank; ValueError otherwise (a collective too)."""
    distributed, group = operator_group(op)
    if not distributed:
        return seed
    if seed is None:
        return shared_seed(group)
    if isinstance(seed, torch.Generator):
        state = seed.get_state()
        if not same_on_all_ranks(state, group):
            raise ValueError(
                "the torch.Generator passed as seed is in a different state on some ranks, so "
                "the ranks would draw different probes; pass an int seed (the same on every "
                "rank) or seed=None (one seed drawn on rank 0 and broadcast)"
            )
    return seed
