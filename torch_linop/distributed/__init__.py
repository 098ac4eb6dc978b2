"""Curvature products on ``torch.distributed``.

Data-parallel (replicated parameters, each rank its own data shard): every operator takes
``process_group=`` and detects an initialised default group; see ``data_parallel``.
Model-sharded (FSDP2 ``fully_shard``, DTensor parameters): ``FSDPHessianOperator``,
``FSDPGGNOperator`` and ``sharded_lanczos`` in ``fsdp`` / ``sharded_solvers`` (imported lazily:
``torch.distributed.fsdp`` takes about a second to import).
"""

from __future__ import annotations

from typing import Any

from torch_linop.distributed.data_parallel import (
    DataParallel,
    RankFailedError,
    same_on_all_ranks,
    shared_seed,
)

_LAZY = {
    "FSDPHessianOperator": "torch_linop.distributed.fsdp",
    "FSDPGGNOperator": "torch_linop.distributed.fsdp",
    "ShardedOperator": "torch_linop.distributed.fsdp",
    "sharded_lanczos": "torch_linop.distributed.sharded_solvers",
    "ShardedEigenResult": "torch_linop.distributed.sharded_solvers",
    "sharded_trace": "torch_linop.distributed.sharded_estimators",
    "sharded_diagonal": "torch_linop.distributed.sharded_estimators",
    "sharded_spectral_density": "torch_linop.distributed.sharded_estimators",
    "rank_consistent_seed": "torch_linop.distributed.seeds",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torch_linop.distributed' has no attribute {name!r}")


__all__ = [
    "DataParallel",
    "rank_consistent_seed",
    "sharded_diagonal",
    "sharded_spectral_density",
    "sharded_trace",
    "FSDPGGNOperator",
    "FSDPHessianOperator",
    "RankFailedError",
    "ShardedEigenResult",
    "ShardedOperator",
    "same_on_all_ranks",
    "shared_seed",
    "sharded_lanczos",
]
