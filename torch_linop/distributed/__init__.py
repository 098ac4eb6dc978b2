"""Curvature products on ``torch.distributed``.

Data-parallel (replicated parameters, each rank its own data shard): every operator takes
``process_group=`` and detects an initialised default group; see ``data_parallel``.
Model-sharded (FSDP2 ``fully_shard``, DTensor parameters): ``FSDPHessianOperator`` and
``FSDPGGNOperator`` in ``fsdp`` (imported lazily: ``torch.distributed.fsdp`` takes about a
second to import), whose ``vector_space`` (``sharded_space.ShardedSpace``) lets the solvers of
``torch_linop.solvers`` run on sharded vectors unchanged.

``sharded_lanczos``, ``sharded_trace``, ``sharded_diagonal`` and ``sharded_spectral_density``
are the solvers ``lanczos``, ``trace``, ``diagonal`` and ``spectral_density`` themselves, under
the names earlier versions documented (resolved by name on first access; no module of this
package imports the solvers).
"""

from __future__ import annotations

from typing import Any

from torch_linop.data_parallel import (
    DataParallel,
    RankFailedError,
    same_on_all_ranks,
    shared_seed,
)

_LAZY = {
    "FSDPHessianOperator": ("torch_linop.distributed.fsdp", "FSDPHessianOperator"),
    "FSDPGGNOperator": ("torch_linop.distributed.fsdp", "FSDPGGNOperator"),
    "ShardedOperator": ("torch_linop.distributed.fsdp", "ShardedOperator"),
    "ShardedSpace": ("torch_linop.distributed.sharded_space", "ShardedSpace"),
    "rank_consistent_seed": ("torch_linop.distributed.seeds", "rank_consistent_seed"),
    # the documented names of the solvers on sharded vectors: the solvers themselves
    "sharded_lanczos": ("torch_linop.solvers", "lanczos"),
    "sharded_trace": ("torch_linop.solvers", "trace"),
    "sharded_diagonal": ("torch_linop.solvers", "diagonal"),
    "sharded_spectral_density": ("torch_linop.solvers", "spectral_density"),
    "ShardedEigenResult": ("torch_linop.solvers", "EigenResult"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'torch_linop.distributed' has no attribute {name!r}")


__all__ = [
    "DataParallel",
    "FSDPGGNOperator",
    "FSDPHessianOperator",
    "RankFailedError",
    "ShardedEigenResult",
    "ShardedOperator",
    "ShardedSpace",
    "rank_consistent_seed",
    "same_on_all_ranks",
    "shared_seed",
    "sharded_diagonal",
    "sharded_lanczos",
    "sharded_spectral_density",
    "sharded_trace",
]
