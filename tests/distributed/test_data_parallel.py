"""Data-parallel products on gloo: 2 and 4 ranks, each with its own shard of the batches, give the
same matrix, eigenvalues and trace as one process on the union of the data (float64, 1e-10).

The ranks are separate Python processes running this file as a script (``python
test_data_parallel.py RANK WORLD OUT``, see ``_gloo_ranks``); they rendezvous through a FileStore
and write their results with ``torch.save``; the assertions run in the pytest process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import EmpiricalFisherOperator, GGNOperator, HessianOperator, supervised_loss
from torch_linop.distributed import same_on_all_ranks, shared_seed
from torch_linop.reference import dense_ggn, dense_hessian

# --import-mode=importlib leaves this folder off sys.path (rank processes start with it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gloo_ranks import classification_batches as labelled_batches  # noqa: E402
from _gloo_ranks import (  # noqa: E402
    make_model,
    one_thread,
    run_rank,
    run_ranks,
    save_results,
)

BATCH_SIZES = (3, 5, 2, 4, 6, 1, 5)
IGNORED_BATCH = 3  # every label ignored: with 4 ranks, rank 3 holds no sample with a target
TOP_K = 3
TOL = 1e-10
LAUNCH_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- the problem
def classification_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shared labelled batches, every label of batch ``IGNORED_BATCH`` set to ignored."""
    batches = labelled_batches(BATCH_SIZES)
    inputs, labels = batches[IGNORED_BATCH]
    batches[IGNORED_BATCH] = (inputs, torch.full_like(labels, -100))
    return batches


def regression_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(size, 4, generator=generator, dtype=torch.float64),
            torch.randn(size, 3, generator=generator, dtype=torch.float64),
        )
        for size in BATCH_SIZES
    ]


def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    """Round-robin: unequal sample and batch counts per rank."""
    return batches[rank::world]


CROSS_ENTROPY = supervised_loss(F.cross_entropy)
MSE_SUM = supervised_loss(nn.MSELoss(reduction="sum"))


def build(name: str, rank: int, world: int, distributed: bool) -> Any:
    """Operator ``name`` on rank ``rank``'s shard (or on all data when ``world == 1``)."""
    from torch_linop.distributed import DataParallel

    model: nn.Module = make_model()
    if name.endswith("_ddp") and distributed:
        model = nn.parallel.DistributedDataParallel(model)
    classification = shard(classification_batches(), rank, world)
    regression = shard(regression_batches(), rank, world)
    if name.startswith("hessian_ce"):
        return HessianOperator(model, classification, CROSS_ENTROPY)
    if name == "hessian_fd":
        return HessianOperator(model, classification, CROSS_ENTROPY, method="finite_difference")
    if name == "hessian_mse_sum":
        return HessianOperator(model, regression, MSE_SUM)
    if name == "ggn_bucketed":  # 43 x 43 float64 product in 15 buckets of 1 KiB
        group = DataParallel(bucket_bytes=1024) if distributed else None
        return GGNOperator(model, classification, CROSS_ENTROPY, process_group=group)
    if name.startswith("ggn_ce"):
        return GGNOperator(model, classification, CROSS_ENTROPY)
    if name == "empirical_fisher":
        return EmpiricalFisherOperator(model, classification, CROSS_ENTROPY)
    if name == "local_only":  # process_group=False: the matrix of this rank's shard alone
        return HessianOperator(model, classification, CROSS_ENTROPY, process_group=False)
    raise ValueError(name)


CONFIGS = (
    "hessian_ce",
    "hessian_ce_ddp",
    "hessian_fd",
    "hessian_mse_sum",
    "ggn_bucketed",
    "ggn_ce_ddp",
    "empirical_fisher",
)


def probe_vector(size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def summarize(op: Any) -> dict[str, Any]:
    """Dense matrix (one matmat of the identity), one matvec, top eigenvalues, trace."""
    size = op.shape[0]
    matrix = op @ torch.eye(size, dtype=torch.float64)
    eigenvalues = np.linalg.eigvalsh(matrix.numpy())
    return {
        "matrix": matrix,
        "matvec": op @ probe_vector(size),
        "top": eigenvalues[::-1][:TOP_K].copy(),
        "trace": float(torch.trace(matrix)),
        "num_data": op.num_data,
    }


def has_targets(batches: list[Any]) -> bool:
    return any(bool((labels != -100).any()) for _, labels in batches)


# ----------------------------------------------------------------------------- worker side
def solver_results(op: Any) -> dict[str, Any]:
    """Seeded Lanczos and Hutch++ on the operator (on every rank: rank-consistency data)."""
    from torch_linop.solvers import lanczos, trace

    eig = lanczos(op, TOP_K, which="LA", seed=0)
    estimate = trace(op, 12, method="hutch++", seed=0)
    return {
        "eigenvalues": eig.eigenvalues,
        "num_matvecs": eig.num_matvecs,
        "trace": estimate.estimate,
        "same_vectors": same_on_all_ranks(eig.eigenvectors),
        "same_values": same_on_all_ranks(torch.from_numpy(eig.eigenvalues)),
    }


def worker_products(rank: int, world: int, out: Path) -> None:
    results: dict[str, Any] = {}
    for name in CONFIGS:
        op = build(name, rank, world, distributed=True)
        summary = summarize(op)
        summary["same_on_all_ranks"] = same_on_all_ranks(summary["matrix"])
        results[name] = summary
    if has_targets(shard(classification_batches(), rank, world)):
        results["local_only"] = summarize(build("local_only", rank, world, distributed=True))
    op = build("hessian_ce_ddp", rank, world, distributed=True)
    results["solvers"] = solver_results(op)
    seed = shared_seed()
    results["shared_seed_same"] = same_on_all_ranks(torch.tensor([seed]))
    save_results(results, out, rank)


# ----------------------------------------------------------------------------- parent side
@pytest.fixture(scope="module")
def references() -> dict[str, Any]:
    """Single process on the union of the data, plus the dense torch.func truths."""
    with one_thread():
        refs: dict[str, Any] = {
            name: summarize(build(name, 0, 1, distributed=False)) for name in CONFIGS
        }
        refs["solvers"] = solver_results(build("hessian_ce", 0, 1, distributed=False))
    model = make_model()
    refs["dense_hessian"] = dense_hessian(model, classification_batches(), CROSS_ENTROPY)
    refs["dense_ggn"] = dense_ggn(model, classification_batches(), CROSS_ENTROPY)
    refs["dense_hessian_mse_sum"] = dense_hessian(model, regression_batches(), MSE_SUM)
    return refs


def test_single_process_references_match_dense_truths(references: dict[str, Any]) -> None:
    truths = {
        "hessian_ce": "dense_hessian",
        "ggn_bucketed": "dense_ggn",
        "hessian_mse_sum": "dense_hessian_mse_sum",
    }
    for name, truth in truths.items():
        torch.testing.assert_close(
            references[name]["matrix"], references[truth], rtol=TOL, atol=TOL
        )


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_one_process_on_the_union(
    world: int, tmp_path: Path, references: dict[str, Any]
) -> None:
    per_rank = run_ranks(__file__, world, tmp_path, LAUNCH_TIMEOUT_S, f"{world} ranks")
    for rank, results in enumerate(per_rank):
        for name in CONFIGS:
            got, want = results[name], references[name]
            where = f"{name} on rank {rank} of {world}"
            assert got["num_data"] == want["num_data"], where
            torch.testing.assert_close(got["matrix"], want["matrix"], rtol=TOL, atol=TOL, msg=where)
            torch.testing.assert_close(got["matvec"], want["matvec"], rtol=TOL, atol=TOL, msg=where)
            np.testing.assert_allclose(got["top"], want["top"], rtol=TOL, atol=TOL, err_msg=where)
            assert abs(got["trace"] - want["trace"]) <= TOL * max(1.0, abs(want["trace"])), where
            assert got["same_on_all_ranks"], f"{where}: ranks hold different products"
        # process_group=False: the matrix of the rank's own shard, not of the union
        own_data = shard(classification_batches(), rank, world)
        if has_targets(own_data):
            local = summarize(HessianOperator(make_model(), own_data, CROSS_ENTROPY))
            torch.testing.assert_close(results["local_only"]["matrix"], local["matrix"])
            assert not torch.allclose(local["matrix"], references["hessian_ce"]["matrix"])
        else:  # rank 3 of 4 holds only ignored labels
            assert "local_only" not in results
    # the solvers see identical products, so their vectors and control flow agree bitwise
    for rank, results in enumerate(per_rank):
        got, want = results["solvers"], references["solvers"]
        where = f"solvers on rank {rank} of {world}"
        assert got["same_vectors"] and got["same_values"], f"{where}: Lanczos diverged"
        assert got["num_matvecs"] == want["num_matvecs"], where
        np.testing.assert_allclose(
            got["eigenvalues"], references["hessian_ce"]["top"], rtol=TOL, atol=TOL, err_msg=where
        )
        assert abs(got["trace"] - want["trace"]) <= TOL * abs(want["trace"]), where
        assert results["shared_seed_same"], f"rank {rank}: shared_seed differs between ranks"


if __name__ == "__main__":
    run_rank(worker_products, group_timeout_s=LAUNCH_TIMEOUT_S)
