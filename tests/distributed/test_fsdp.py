"""FSDP2-sharded products on gloo (2 ranks, uneven shards, unequal batch counts): the sharded
finite-difference Hessian and GGN equal the single-process finite-difference operators on the
union of the data (same step rule, so to rounding) and approximate the exact matrices; the exact
methods (reverse-over-forward Hessian, forward-mode GGN, also with a parameter filter that skips
a block) equal the dense torch.func matrices to rounding; no product changes the model or its
gradients; ``torch_linop.solvers.lanczos`` itself (no sharded copy) finds the top eigenvalues
and eigenvectors of the sharded operators on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_linop import GGNOperator, HessianOperator, supervised_loss
from torch_linop.reference import dense_ggn, dense_hessian

# --import-mode=importlib leaves this folder off sys.path (rank processes start with it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gloo_ranks import (  # noqa: E402
    classification_batches,
    make_model,
    make_sharded_model,
    one_thread,
    run_rank,
    run_ranks,
    save_results,
)

WORLD = 2
BATCH_SIZES = (3, 5, 2, 4, 6)  # rank 0: 3 batches, rank 1: 2 (padding steps on rank 1)
TOP_K = 3
LAUNCH_TIMEOUT_S = 60.0
SAME_APPROXIMATION = 1e-9  # sharded vs single-process finite differences (same step rule)
EXACT = 1e-8  # finite differences vs exact matrices, relative to the largest entry (~5e-10)
ROUNDING = 1e-12  # exact sharded products vs dense matrices, relative to the largest entry
LOSS = supervised_loss(F.cross_entropy)
EXACT_COLUMNS = 4  # random vectors multiplied by each exact operator


def first_and_last_bias(name: str, _param: Any) -> bool:
    """A filter that selects from two blocks and skips the middle of the model's parameters."""
    return name in ("0.weight", "2.bias")


def exact_vectors() -> torch.Tensor:
    return torch.randn(43, EXACT_COLUMNS, generator=torch.Generator().manual_seed(5)).double()


# ----------------------------------------------------------------------------- worker side
def worker(rank: int, world: int, out: Path) -> None:

    from torch_linop.distributed import FSDPGGNOperator, FSDPHessianOperator, same_on_all_ranks
    from torch_linop.solvers import lanczos

    model = make_sharded_model()
    own = classification_batches(BATCH_SIZES)[rank::world]
    before = {name: p.to_local().clone() for name, p in model.named_parameters()}
    user_grads = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        param.grad = user_grads[name]

    results: dict[str, Any] = {}
    for name, op in (
        ("hessian", FSDPHessianOperator(model, own, LOSS)),
        ("ggn", FSDPGGNOperator(model, own, LOSS, jvp_method="finite_difference")),
    ):
        size = op.shape[0]
        identity = torch.eye(size, dtype=torch.float64)
        local_product = op @ op.shard_vector(identity)
        results[name] = {
            "matrix": op.full_vector(local_product),
            "local_size": op.local_size,
            "num_data": op.num_data,
        }
        # finite-difference products are accurate to ~1e-10: ask for what they can give
        eig = lanczos(op, TOP_K, which="LA", tol=1e-8, seed=0)
        results[name]["lanczos"] = eig.eigenvalues
        results[name]["lanczos_same"] = same_on_all_ranks(torch.from_numpy(eig.eigenvalues))
        results[name]["eigenvectors"] = op.full_vector(eig.eigenvectors.T)  # (n, k)
    for name, exact_op in (
        ("hessian_exact", FSDPHessianOperator(model, own, LOSS, method="autograd")),
        ("ggn_exact", FSDPGGNOperator(model, own, LOSS)),  # forward-mode JVP by default
        (
            "hessian_exact_filtered",
            FSDPHessianOperator(
                model, own, LOSS, method="autograd", param_filter=first_and_last_bias
            ),
        ),
    ):
        vectors = exact_vectors()[: exact_op.shape[0]]
        results[name] = exact_op.full_vector(exact_op @ exact_op.shard_vector(vectors))
    with pytest.raises(ValueError, match="method must be one of"):
        FSDPHessianOperator(model, own, LOSS, method="forward")
    with pytest.raises(ValueError, match="jvp_method must be one of"):
        FSDPGGNOperator(model, own, LOSS, jvp_method="double_backward")
    results["params_restored"] = all(
        torch.equal(before[name], p.to_local()) for name, p in model.named_parameters()
    )
    results["grads_restored"] = all(
        p.grad is user_grads[name] for name, p in model.named_parameters()
    )
    save_results(results, out, rank)


# ----------------------------------------------------------------------------- parent side
def test_sharded_products_and_lanczos(tmp_path: Path) -> None:
    per_rank = run_ranks(__file__, WORLD, tmp_path, LAUNCH_TIMEOUT_S, "FSDP ranks")
    model, data = make_model(), classification_batches(BATCH_SIZES)
    with one_thread():
        identity = torch.eye(43, dtype=torch.float64)
        fd = {
            "hessian": HessianOperator(model, data, LOSS, method="finite_difference") @ identity,
            "ggn": GGNOperator(model, data, LOSS, jvp_method="finite_difference") @ identity,
        }
        exact = {"hessian": dense_hessian(model, data, LOSS), "ggn": dense_ggn(model, data, LOSS)}
        exact_truths = {
            "hessian_exact": exact["hessian"],
            "ggn_exact": exact["ggn"],
            "hessian_exact_filtered": dense_hessian(
                model, data, LOSS, param_filter=first_and_last_bias
            ),
        }
    assert sum(r["hessian"]["local_size"] for r in per_rank) == 43  # vectors stay sharded
    for rank, results in enumerate(per_rank):
        assert results["params_restored"], f"rank {rank}: parameters changed"
        assert results["grads_restored"], f"rank {rank}: the user's .grad was not restored"
        for name in ("hessian", "ggn"):
            got = results[name]
            where = f"{name} on rank {rank}"
            assert got["num_data"] == sum(BATCH_SIZES), where
            scale = float(exact[name].abs().max())
            torch.testing.assert_close(
                got["matrix"], fd[name], rtol=0, atol=SAME_APPROXIMATION * scale, msg=where
            )
            torch.testing.assert_close(
                got["matrix"], exact[name], rtol=0, atol=EXACT * scale, msg=where
            )
            top = np.linalg.eigvalsh(exact[name].numpy())[::-1][:TOP_K]
            np.testing.assert_allclose(
                got["lanczos"], top, rtol=0, atol=EXACT * scale, err_msg=where
            )
            assert got["lanczos_same"], f"{where}: ranks disagree on the eigenvalues"
            vectors = got["eigenvectors"]
            residual = exact[name] @ vectors - vectors * torch.from_numpy(top.copy())
            assert float(residual.norm(dim=0).max()) < 1e-6 * scale, where
        for name, matrix in exact_truths.items():
            want = matrix @ exact_vectors()[: matrix.shape[0]]
            torch.testing.assert_close(
                results[name],
                want,
                rtol=0,
                atol=ROUNDING * float(matrix.abs().max()),
                msg=f"{name} on rank {rank}",
            )


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=LAUNCH_TIMEOUT_S)
