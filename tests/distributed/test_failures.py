"""A rank that raises during a product ends the product on every rank, in bounded time, with the
original error on the failing rank and a ``RankFailedError`` naming it on the others; the process
group stays usable (the next product is correct).

Ranks are Python processes running this file as a script; see _gloo_ranks.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import HessianOperator, supervised_loss
from torch_linop.distributed import DataParallel

# --import-mode=importlib leaves this folder off sys.path (rank processes start with it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gloo_ranks import (  # noqa: E402
    load_results,
    run_rank,
    save_results,
    start_ranks,
    wait_for_ranks,
)

WORLD = 2
FAILING_RANK = 1
LAUNCH_TIMEOUT_S = 60.0
GROUP_TIMEOUT_S = 30.0  # the process group's own bound for collectives that never match


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batches(rank: int, bad: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches per rank; with ``bad``, the failing rank's second batch has 5 features
    instead of 3 (the model raises a shape error on it)."""
    generator = torch.Generator().manual_seed(10 + rank)
    data = []
    for index in range(3):
        features = 5 if bad and rank == FAILING_RANK and index == 1 else 3
        inputs = torch.randn(4, features, generator=generator, dtype=torch.float64)
        data.append((inputs, torch.randint(0, 2, (4,), generator=generator)))
    return data


def count_that_fails_on(rank: int):
    def batch_size(batch: Any) -> int:
        if rank == FAILING_RANK:
            raise ValueError(f"cannot count this batch on rank {rank} (deliberate)")
        return int(batch[0].shape[0])

    return batch_size


def outcome(fn) -> dict[str, str]:
    try:
        fn()
    except Exception as error:  # the test inspects whatever was raised
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": "none", "message": ""}


# ----------------------------------------------------------------------------- worker side
def worker(rank: int, world: int, out: Path) -> None:
    ce_mean = supervised_loss(F.cross_entropy)
    ce_sum = supervised_loss(nn.CrossEntropyLoss(reduction="sum"))
    vector = torch.ones(26, dtype=torch.float64)
    results = {}
    # 1: the sample count fails on one rank (the others wait in the count all-reduce)
    op = HessianOperator(
        make_model(), batches(rank, False), ce_mean, batch_size_fn=count_that_fails_on(rank)
    )
    results["count"] = outcome(lambda: op @ vector)
    # 2: a bad batch in the product (the others wait in the product all-reduce)
    op = HessianOperator(make_model(), batches(rank, True), ce_mean)
    results["product_mean"] = outcome(lambda: op @ vector)
    # 2b: the same for a 26-column matmat reduced in 6 buckets of 1 KiB
    op = HessianOperator(
        make_model(), batches(rank, True), ce_mean, process_group=DataParallel(bucket_bytes=1024)
    )
    results["product_bucketed"] = outcome(lambda: op @ torch.eye(26, dtype=torch.float64))
    # 3: the same with a summed loss (no count all-reduce at all)
    op = HessianOperator(make_model(), batches(rank, True), ce_sum)
    results["product_sum"] = outcome(lambda: op @ vector)
    # 4: the group still works: a healthy product equals the 2-rank sum computed locally
    op = HessianOperator(make_model(), batches(rank, False), ce_sum)
    results["after"] = op @ vector
    save_results(results, out, rank)
    # 5: an uncaught failure ends every process with its error
    HessianOperator(make_model(), batches(rank, True), ce_mean) @ vector


# ----------------------------------------------------------------------------- parent side
def test_a_failing_rank_fails_every_rank(tmp_path: Path) -> None:
    started = time.monotonic()
    processes = start_ranks(__file__, WORLD, tmp_path)
    stderrs = wait_for_ranks(processes, LAUNCH_TIMEOUT_S, "the ranks (a rank hangs)")
    elapsed = time.monotonic() - started
    # the failure is shared through the product's own all-reduce, not the group timeout
    assert elapsed < LAUNCH_TIMEOUT_S

    for rank, process in enumerate(processes):
        assert process.returncode != 0, f"rank {rank} exited cleanly after an uncaught failure"
    shape_error = "mat1 and mat2 shapes cannot be multiplied"
    assert (
        "RankFailedError" in stderrs[0] and f"rank {FAILING_RANK} raised RuntimeError" in stderrs[0]
    )
    assert shape_error in stderrs[0]  # the original message reaches the healthy rank
    assert shape_error in stderrs[FAILING_RANK] and "RankFailedError" not in stderrs[FAILING_RANK]

    results = load_results(tmp_path, WORLD)
    healthy, failing = results[0], results[FAILING_RANK]
    assert failing["count"]["type"] == "ValueError"
    assert "cannot count this batch" in failing["count"]["message"]
    assert healthy["count"]["type"] == "RankFailedError"
    assert f"rank {FAILING_RANK} raised ValueError: cannot count" in healthy["count"]["message"]
    for case in ("product_mean", "product_bucketed", "product_sum"):
        assert failing[case]["type"] == "RuntimeError" and shape_error in failing[case]["message"]
        assert (
            healthy[case]["type"] == "RankFailedError" and shape_error in healthy[case]["message"]
        )

    loss = supervised_loss(nn.CrossEntropyLoss(reduction="sum"))
    union = [batch for rank in range(WORLD) for batch in batches(rank, False)]
    expected = HessianOperator(make_model(), union, loss) @ torch.ones(26, dtype=torch.float64)
    for result in results:
        torch.testing.assert_close(result["after"], expected, rtol=1e-12, atol=1e-12)


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=GROUP_TIMEOUT_S)
