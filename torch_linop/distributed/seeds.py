"""Rank-consistent seeds: ``seed=None`` in a distributed run means one fresh seed for all ranks.

A solver draws its probes from its seed. With ``seed=None`` every rank would draw its own
entropy, multiply different vectors, and either hang (ranks leave loops at different steps) or
silently mix the vectors in the all-reduced product. The solvers ask the operator's
``vector_space`` for the seed (its ``shared_seed``); :func:`rank_consistent_seed` does the same
for code that draws its own vectors.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_consistent_seed(
    seed: int | torch.Generator | None, op: Any
) -> int | torch.Generator | None:
    """``seed``, except that ``None`` becomes one seed drawn on the first rank of ``op``'s
    process group and broadcast when ``op`` is distributed (a collective: every rank of the
    group must call it, as they call the solver). A ``torch.Generator`` on a distributed
    operator must be in the same state on every rank; ValueError otherwise (a collective too).
    Operators without a ``vector_space`` (local ones) keep their seed and run no collective."""
    space = getattr(op, "vector_space", None)
    return seed if space is None else space.shared_seed(seed)
