"""The solvers of ``torch_linop.solvers`` on FSDP2-sharded vectors (2 and 4 gloo ranks, uneven
shards, one rank of four holding no rows of some parameters): the very functions the single
process calls, with the same defaults, run on the sharded operators through their
``vector_space`` and give the single-process numbers on the unsharded operator with the same
seed (same probes), to 1e-10 in float64: Hutch++/Hutchinson/XTrace/Krylov-aware traces, the
Hutchinson diagonal, SLQ densities (including runs cut short by an invariant subspace, and ranks
holding no entries), Lanczos and power iteration. The TSQR factorisation is orthonormal and spans
the block; ``seed=None`` gives the same numbers on every rank, for sharded and for data-parallel
operators; the documented ``sharded_*`` names are the solvers themselves.

The ranks run this file as a script and write their results with ``torch.save``; the
assertions run in the pytest process.
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
from torch_linop.solvers import diagonal, lanczos, power_iteration, spectral_density, trace

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

BATCH_SIZES = (3, 5, 2, 4)  # one or two batches per rank, unequal sample counts
TOL = 1e-10
LAUNCH_TIMEOUT_S = 90.0  # a guard against hangs on a loaded machine, not a time budget
LOSS = supervised_loss(F.cross_entropy)
LAST_WEIGHT = "2.weight"  # 3 rows: with 4 ranks, the last rank holds none

# (label, operator, solver, keyword arguments): run sharded and single-process with equal seeds
CASES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("hessian_hutchpp", "hessian", "trace", {"num_matvecs": 7, "seed": 0}),
    ("ggn_hutchpp_gaussian", "ggn", "trace", {"num_matvecs": 6, "seed": 3, "distribution": "gaussian", "block_size": 2}),  # noqa: E501
    ("ggn_hutchinson", "ggn", "trace", {"num_matvecs": 3, "seed": 4, "method": "hutchinson", "block_size": 2}),  # noqa: E501
    ("hessian_slq", "hessian", "density", {"num_runs": 2, "lanczos_steps": 4, "seed": 1, "grid_size": 64}),  # noqa: E501
    ("matrix_slq_breakdown", "matrix", "density", {"num_runs": 3, "lanczos_steps": 6, "seed": 5, "grid_size": 32}),  # noqa: E501
    ("ggn_xtrace", "ggn", "trace", {"num_matvecs": 8, "seed": 7, "method": "xtrace"}),
    ("hessian_krylov_trace", "hessian", "trace", {"num_matvecs": 8, "seed": 8, "method": "krylov"}),  # noqa: E501
    ("ggn_lanczos", "ggn", "lanczos", {"k": 2, "seed": 9}),
    ("hessian_block_lanczos", "hessian", "lanczos", {"k": 2, "block_size": 2, "seed": 10, "which": "BE"}),  # noqa: E501
    ("ggn_power", "ggn", "power", {"k": 1, "seed": 11, "max_iter": 12}),
)  # fmt: skip


SOLVERS: dict[str, Any] = {
    "trace": trace,
    "density": spectral_density,
    "lanczos": lanczos,
    "power": power_iteration,
}


def same_r(per_rank: list[dict[str, Any]]) -> bool:
    """Whether every rank got the bitwise same TSQR factor R."""
    first = per_rank[0]["tsqr_triangular"]
    return all(torch.equal(first, results["tsqr_triangular"]) for results in per_rank)


def only_last_weight(name: str, _param: Any) -> bool:
    return name == LAST_WEIGHT


def block_matrix() -> torch.Tensor:
    """10 x 10 with eigenvalues 0.5, 1, 1.5, 3 (eigenvectors (1, +-1) in each 2 x 2 block) and
    entries that are powers of two: products are exact, so a Lanczos run from a sign vector finds
    its (at most 4-d) invariant subspace with a coupling of ~1e-18 of the breakdown threshold, on
    one rank as on several, and the weights depend on the probe's signs."""
    block = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    return torch.block_diag(block, 2 * block, block, 2 * block, block)


class ShardedMatrix:
    """A dense symmetric matrix seen as a sharded operator over one "parameter" of n rows: what
    the solvers see of ``ShardedOperator`` (shape, dtype, device, ``matmat`` on this rank's rows
    and a ``vector_space``)."""

    def __init__(self, matrix: torch.Tensor, group: Any) -> None:
        import torch.distributed as dist

        from torch_linop.distributed.sharded_space import ShardedSpace, local_rows

        self.matrix, self.group = matrix, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shape = tuple(matrix.shape)
        self.rows = local_rows(matrix.shape[0], self.world, self.rank)
        self.local_size = self.rows[1] - self.rows[0]
        self.device, self.torch_dtype = matrix.device, matrix.dtype
        self.vector_space = ShardedSpace(group, [self.rows], matrix.device)

    def shard_vector(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rows[0] : self.rows[1]]

    def apply(self, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        chunk = -(-self.shape[0] // self.world)
        padded = torch.zeros(chunk, local.shape[1], dtype=local.dtype)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        full = torch.cat(parts)[: self.shape[0]]
        return self.shard_vector(self.matrix @ full)

    matmat = apply


class Preempted(Exception):
    pass


class Interrupting:
    """A sharded operator that raises :class:`Preempted` on every rank after ``after`` product
    columns (as a preempted job would stop), counting the columns it multiplied."""

    def __init__(self, op: Any, after: int) -> None:
        self.op, self.after, self.count = op, after, 0
        self.shape, self.device, self.torch_dtype = op.shape, op.device, op.torch_dtype
        self.vector_space, self.fingerprint = op.vector_space, op.fingerprint

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.count += block.shape[1]
        if self.count > self.after:
            raise Preempted
        return self.op.matmat(block)


def summary(result: Any) -> dict[str, Any]:
    if hasattr(result, "eigenvalues"):
        return {
            "eigenvalues": result.eigenvalues,
            "residuals": result.residuals,
            "eigenvectors": result.eigenvectors,
            "n": result.num_matvecs,
        }
    if hasattr(result, "estimate"):
        return {"estimate": result.estimate, "stderr": result.stderr, "n": result.num_matvecs}
    return {
        "nodes": result.nodes,
        "weights": result.weights,
        "density": result.density,
        "grid": result.grid,
        "n": result.num_matvecs,
    }


# ----------------------------------------------------------------------------- worker side
def worker(rank: int, world: int, out: Path) -> None:

    import torch_linop.distributed as distributed
    from torch_linop.distributed import same_on_all_ranks
    from torch_linop.distributed.fsdp import FSDPGGNOperator, FSDPHessianOperator
    from torch_linop.distributed.seeds import rank_consistent_seed

    model = make_sharded_model()
    own = classification_batches(BATCH_SIZES)[rank::world]
    ops: dict[str, Any] = {
        "hessian": FSDPHessianOperator(model, own, LOSS, method="autograd"),
        "ggn": FSDPGGNOperator(model, own, LOSS),
        "last_ggn": FSDPGGNOperator(model, own, LOSS, param_filter=only_last_weight),
        "matrix": ShardedMatrix(block_matrix(), None),
    }
    results: dict[str, Any] = {"local_sizes": {name: op.local_size for name, op in ops.items()}}
    results["aliases"] = [
        getattr(distributed, f"sharded_{name}") is solver
        for name, solver in [
            ("lanczos", lanczos),
            ("trace", trace),
            ("diagonal", diagonal),
            ("spectral_density", spectral_density),
        ]
    ]
    results["last_ggn_trace"] = summary(trace(ops["last_ggn"], 4, seed=6))
    top = lanczos(ops["last_ggn"], 1, seed=None)
    results["last_ggn_top"] = top.eigenvalues
    results["last_ggn_top_same"] = same_on_all_ranks(torch.from_numpy(top.eigenvalues))
    for label, name, solver, kwargs in CASES:
        results[label] = summary(SOLVERS[solver](ops[name], **kwargs))
        if solver in ("lanczos", "power"):  # this rank's entries -> full vectors (rows)
            local = results[label]["eigenvectors"]
            results[label]["eigenvectors"] = ops[name].full_vector(local.T).T

    diagonal_part = diagonal(ops["ggn"], 5, seed=2, block_size=2)
    results["ggn_diagonal"] = ops["ggn"].full_vector(diagonal_part.estimate)
    results["ggn_diagonal_stderr"] = ops["ggn"].full_vector(diagonal_part.stderr)
    xdiag_part = diagonal(ops["ggn"], 6, method="xdiag", seed=12)
    results["ggn_xdiag"] = ops["ggn"].full_vector(xdiag_part.estimate)
    results["ggn_xdiag_stderr"] = ops["ggn"].full_vector(xdiag_part.stderr)

    # a checkpointed run (one file per rank), preempted and resumed: the uninterrupted numbers,
    # bit for bit, and the fingerprint costs no product (the operator describes itself)
    path = out / f"trace_rank{rank}.pt"
    options: dict[str, Any] = {"seed": 13, "block_size": 2, "checkpoint_every": 2}
    try:
        trace(Interrupting(ops["ggn"], 5), 9, checkpoint=path, **options)
        results["preempted"] = False
    except Preempted:
        results["preempted"] = True
    from torch_linop.solvers.checkpoint import rank_path

    saved = torch.load(rank_path(path, rank, world), weights_only=True)  # the rank's own file
    results["saved_products"] = saved["num_matvecs"]
    resuming = Interrupting(ops["ggn"], 10**9)
    resumed = trace(resuming, 9, checkpoint=path, **options)
    options.pop("checkpoint_every")
    uninterrupted = trace(ops["ggn"], 9, **options)
    results["resumed_identical"] = (resumed.estimate, resumed.stderr) == (
        uninterrupted.estimate,
        uninterrupted.stderr,
    )
    results["resumed_products"] = resuming.count

    # seed=None: one seed for all ranks, sharded and data-parallel
    unseeded = trace(ops["matrix"], 4, seed=None)
    results["unseeded_same"] = same_on_all_ranks(torch.tensor([unseeded.estimate]))
    data_parallel = HessianOperator(make_model(), own, LOSS)
    seed = rank_consistent_seed(None, data_parallel)
    results["dp_seed_same"] = isinstance(seed, int) and same_on_all_ranks(torch.tensor([seed]))
    estimate = trace(data_parallel, 6, method="hutchinson", seed=seed).estimate
    results["dp_trace_same"] = same_on_all_ranks(torch.tensor([estimate]))
    # the solvers themselves turn seed=None into one shared seed on a data-parallel operator
    plain_none = trace(data_parallel, 6, method="hutchinson", seed=None).estimate
    results["dp_trace_none_same"] = same_on_all_ranks(torch.tensor([plain_none]))
    local_only = HessianOperator(make_model(), own, LOSS, process_group=False)
    results["local_seed"] = rank_consistent_seed(None, local_only)  # no collective: None
    results["int_seed_kept"] = rank_consistent_seed(7, data_parallel)

    # TSQR of a sharded 43 x 5 block
    op = ops["ggn"]
    block = torch.randn(op.shape[0], 5, generator=torch.Generator().manual_seed(9)).double()
    basis, triangular = op.vector_space.qr(op.shard_vector(block))
    results["tsqr"] = op.full_vector(basis)
    results["tsqr_triangular"] = triangular
    results["tsqr_block"] = block

    # a NaN in rank 0's rows only: every rank raises (one all-reduced flag), none waits
    poisoned = block_matrix()
    poisoned[0, 0] = float("nan")
    nan_op = ShardedMatrix(poisoned, None)
    results["nan_rows_here"] = not bool(torch.isfinite(nan_op.shard_vector(poisoned)).all())
    try:
        trace(nan_op, 3, method="hutchinson", seed=0)
        results["nan_error"] = None
    except FloatingPointError as error:
        results["nan_error"] = str(error)
    save_results(results, out, rank)


# ----------------------------------------------------------------------------- parent side
@pytest.fixture(scope="module")
def references() -> dict[str, Any]:
    """The single-process solvers on the unsharded exact operators over all the data."""
    model, data = make_model(), classification_batches(BATCH_SIZES)
    with one_thread():
        ops: dict[str, Any] = {
            "hessian": HessianOperator(model, data, LOSS),
            "ggn": GGNOperator(model, data, LOSS),
            "last_ggn": GGNOperator(model, data, LOSS, param_filter=only_last_weight),
            "matrix": block_matrix(),
        }
        refs: dict[str, Any] = {}
        for label, name, solver, kwargs in CASES:
            refs[label] = summary(SOLVERS[solver](ops[name], **kwargs))
        refs["last_ggn_trace"] = summary(trace(ops["last_ggn"], 4, seed=6))
        single = diagonal(ops["ggn"], 5, seed=2, block_size=2)
        refs["ggn_diagonal"], refs["ggn_diagonal_stderr"] = single.estimate, single.stderr
        single = diagonal(ops["ggn"], 6, method="xdiag", seed=12)
        refs["ggn_xdiag"], refs["ggn_xdiag_stderr"] = single.estimate, single.stderr
        last_ggn = ops["last_ggn"] @ torch.eye(15, dtype=torch.float64)
        refs["last_ggn_top"] = float(torch.linalg.eigvalsh(last_ggn)[-1])
    return refs


def test_the_breakdown_case_breaks_down(references: dict[str, Any]) -> None:
    """Every 6-step run on the block matrix ends at an invariant subspace of at most 4
    dimensions (zero weights after it), and the runs' probes differ (different weights), so the
    sharded runs match only if they cut each run at the same step and consume the generator as
    the single-process solver does after a breakdown."""
    weights = references["matrix_slq_breakdown"]["weights"]
    assert (weights[:, 4:] == 0).all()
    assert not np.allclose(weights[0], weights[1]) or not np.allclose(weights[1], weights[2])


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_estimators_match_single_process(
    world: int, tmp_path: Path, references: dict[str, Any]
) -> None:
    per_rank = run_ranks(__file__, world, tmp_path, LAUNCH_TIMEOUT_S, f"{world} sharded ranks")
    assert sum(r["local_sizes"]["hessian"] for r in per_rank) == 43
    assert sum(r["local_sizes"]["last_ggn"] for r in per_rank) == 15
    if world == 4:  # 3 rows in chunks of 1: the last rank holds none
        assert per_rank[3]["local_sizes"]["last_ggn"] == 0
    for rank, results in enumerate(per_rank):
        where = f"rank {rank} of {world}"
        assert all(results["aliases"]), f"{where}: a sharded_* name is not the solver itself"
        for label, solver in [(case[0], case[2]) for case in CASES] + [("last_ggn_trace", "trace")]:
            got, want = results[label], references[label]
            message = f"{label} on {where}"
            assert got["n"] == want["n"], message
            if solver in ("lanczos", "power"):
                scale = float(np.abs(want["eigenvalues"]).max())
                np.testing.assert_allclose(
                    got["eigenvalues"],
                    want["eigenvalues"],
                    rtol=0,
                    atol=TOL * scale,
                    err_msg=message,
                )
                np.testing.assert_allclose(
                    got["residuals"], want["residuals"], rtol=0, atol=1e-9, err_msg=message
                )
                vectors, expected = got["eigenvectors"], want["eigenvectors"]
                signs = torch.sign((vectors * expected).sum(dim=1, keepdim=True))
                torch.testing.assert_close(
                    vectors * signs, expected, rtol=0, atol=1e-8, msg=message
                )
            elif solver == "trace":
                for key in ("estimate", "stderr"):
                    assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), message
            else:
                for key in ("nodes", "weights", "grid"):
                    np.testing.assert_allclose(
                        got[key], want[key], rtol=TOL, atol=TOL, err_msg=message
                    )
                np.testing.assert_allclose(
                    got["density"],
                    want["density"],
                    rtol=0,
                    atol=1e-8 * float(want["density"].max()),
                    err_msg=message,
                )
        assert results["preempted"] and results["resumed_identical"], where
        assert 0 < results["saved_products"] <= 5, where  # interrupted after 5 products
        assert results["resumed_products"] == 9 - results["saved_products"], where
        assert results["unseeded_same"], f"{where}: seed=None gave rank-dependent probes"
        assert results["last_ggn_top_same"], f"{where}: sharded Lanczos differs between ranks"
        top = references["last_ggn_top"]
        assert abs(results["last_ggn_top"][0] - top) <= TOL * top, where
        assert results["dp_seed_same"], f"{where}: data-parallel seed=None not shared"
        assert results["dp_trace_same"], f"{where}: data-parallel trace differs between ranks"
        assert results["dp_trace_none_same"], f"{where}: seed=None gave rank-dependent probes"
        assert results["local_seed"] is None, where
        assert results["int_seed_kept"] == 7, where
        assert results["nan_rows_here"] == (rank == 0), where  # the NaN row is rank 0's
        assert results["nan_error"] is not None, f"{where}: no error on a non-finite product"
        assert "the operator returned non-finite values (nan/inf)" in results["nan_error"]
        for key in ("ggn_diagonal", "ggn_diagonal_stderr", "ggn_xdiag", "ggn_xdiag_stderr"):
            torch.testing.assert_close(
                results[key], references[key], rtol=TOL, atol=TOL, msg=f"{key} on {where}"
            )
        basis, block = results["tsqr"], results["tsqr_block"]
        torch.testing.assert_close(basis.T @ basis, torch.eye(5).double(), rtol=0, atol=1e-13)
        torch.testing.assert_close(basis @ (basis.T @ block), block, rtol=0, atol=1e-12)
        torch.testing.assert_close(basis @ results["tsqr_triangular"], block, rtol=0, atol=1e-12)
        assert same_r(per_rank), "the TSQR factor R differs between ranks"


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=LAUNCH_TIMEOUT_S)
