"""Data-parallel KFAC / EKFAC on 2 gloo ranks, each with its own shard of the batches, equals one
process on the union of the data (float64, 1e-10), including a shard whose batch has only
ignored labels. The ranks run this file as a script (see tests/distributed/_gloo_ranks.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_linop.kfac import EKFACOperator, KFACOperator

# --import-mode=importlib leaves the helpers' folder off sys.path (rank processes need it too)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _gloo_ranks import (  # noqa: E402
    classification_batches,
    make_model,
    one_thread,
    run_rank,
    run_ranks,
    save_results,
)

BATCH_SIZES = (3, 5, 2, 4, 6, 1)
LAUNCH_TIMEOUT_S = 60.0
CONFIGS = {
    "kfac_type2_expand": (KFACOperator, {"fisher_type": "type-2"}),
    "kfac_empirical_joined": (
        KFACOperator,
        {"fisher_type": "empirical", "separate_weight_and_bias": False},
    ),
    "ekfac_type2": (EKFACOperator, {"fisher_type": "type-2"}),
}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = classification_batches(BATCH_SIZES)
    inputs, labels = data[3]
    data[3] = (inputs, torch.full_like(labels, -100))  # rank 1 of 2 holds this batch
    return data


def dense_matrices(rank: int, world: int, process_group: Any) -> dict[str, torch.Tensor]:
    shard = batches()[rank::world]
    return {
        name: operator_class(
            make_model(), shard, nn.CrossEntropyLoss(), process_group=process_group, **options
        ).to_dense()
        for name, (operator_class, options) in CONFIGS.items()
    }


def worker(rank: int, world: int, out: Path) -> None:
    save_results(dense_matrices(rank, world, None), out, rank)


def test_two_ranks_equal_one_process_on_the_union(tmp_path: Path) -> None:
    with one_thread():
        reference = dense_matrices(0, 1, False)
        local = dense_matrices(0, 2, False)
    per_rank = run_ranks(__file__, 2, tmp_path, LAUNCH_TIMEOUT_S, "2 KFAC ranks")
    for rank, results in enumerate(per_rank):
        for name, matrix in reference.items():
            torch.testing.assert_close(
                results[name], matrix, rtol=1e-10, atol=1e-12, msg=f"{name} on rank {rank}"
            )
    # without the reduction, a rank's operator is that of its own shard: the test can fail
    assert not torch.allclose(local["kfac_type2_expand"], reference["kfac_type2_expand"])


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=LAUNCH_TIMEOUT_S)
