"""The data-parallel reduction, at its documented path: it lives in ``torch_linop.data_parallel``
(a product-level module, so that the base operator does not import this package)."""

from torch_linop.data_parallel import (
    DEFAULT_BUCKET_BYTES,
    DataParallel,
    RankFailedError,
    ReplicatedSpace,
    all_reduce_count,
    all_reduce_product,
    check_process_group,
    comm_device,
    consistent_seed,
    resolve,
    same_on_all_ranks,
    share_failure,
    shared_seed,
    unwrap_model,
    vector_space,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DataParallel",
    "RankFailedError",
    "ReplicatedSpace",
    "all_reduce_count",
    "all_reduce_product",
    "check_process_group",
    "comm_device",
    "consistent_seed",
    "resolve",
    "same_on_all_ranks",
    "share_failure",
    "shared_seed",
    "unwrap_model",
    "vector_space",
]
