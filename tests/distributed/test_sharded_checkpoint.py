"""Sharded checkpoints (issue 21): a sharded Lanczos run over 2 (and 4) gloo ranks, checkpointed
with one path, keeps one file per rank (``path.rank{R}-of-{N}``, recording rank, world size, run
id and step); killed after 7 products and resumed it returns the uninterrupted run's eigenpairs
bit for bit. Ranks whose save clocks differ still save at the same steps. Resuming is refused on
every rank (none is left waiting in a collective) when a rank file was copied from another rank,
comes from another run or an older save point, or is missing, and when a run on another world
size finds them (4 ranks resuming 2 ranks' files, and 2 ranks 4's).
Unsharded runs keep the single file and its format.

The ranks run this file as a script and write their results with ``torch.save``; the
assertions run in the pytest process.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_linop import supervised_loss
from torch_linop.solvers import lanczos

# --import-mode=importlib leaves this folder off sys.path (rank processes start with it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gloo_ranks import (  # noqa: E402
    classification_batches,
    make_sharded_model,
    run_rank,
    run_ranks,
    save_results,
)

BATCH_SIZES = (3, 5, 2, 4)
LAUNCH_TIMEOUT_S = 90.0  # a guard against hangs on a loaded machine, not a time budget
LOSS = supervised_loss(F.cross_entropy)
OPTIONS: dict[str, Any] = {"seed": 3, "checkpoint_every": 2}
STOP_AFTER = 7  # products before the "preemption"


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


def refusal(call: Callable[[], Any]) -> str | None:
    """The message of the ValueError ``call`` raises (None if it raised none)."""
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def interrupted_then_resumed(
    op: Any, path: Path, keep: Path | None = None, **options: Any
) -> dict[str, Any]:
    """Run until :data:`STOP_AFTER` products, then resume from ``path`` to the end; ``keep``:
    where to copy this rank's file as it was after the preemption."""
    import torch.distributed as dist

    from torch_linop.solvers.checkpoint import rank_path

    try:
        lanczos(Interrupting(op, STOP_AFTER), 2, checkpoint=path, **options)
        preempted = False
    except Preempted:
        preempted = True
    own = rank_path(path, dist.get_rank(), dist.get_world_size())
    saved = torch.load(own, weights_only=True)
    if keep is not None:
        shutil.copy(own, keep)
    resuming = Interrupting(op, 10**9)
    resumed = lanczos(resuming, 2, checkpoint=path, **options)
    return {
        "preempted": preempted,
        "saved": {key: saved[key] for key in ("world_size", "rank", "run_id", "num_matvecs")},
        "resumed": resumed,
        "resumed_products": resuming.count,
    }


# ----------------------------------------------------------------------------- worker side
def worker(rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    from torch_linop.distributed.fsdp import FSDPGGNOperator
    from torch_linop.solvers.checkpoint import rank_path

    folder = Path((out / "folder").read_text())
    ggn = FSDPGGNOperator(
        make_sharded_model(), classification_batches(BATCH_SIZES)[rank::world], LOSS
    )
    path = folder / "lanczos.pt"
    results: dict[str, Any] = {}
    if (out / "scenario").read_text() == "other_world":
        results["other_world"] = refusal(
            lambda: lanczos(Interrupting(ggn, 10**9), 2, checkpoint=path, **OPTIONS)
        )
        save_results(results, out, rank)
        return

    run = interrupted_then_resumed(ggn, path, folder / f"early{rank}", **OPTIONS)
    counting = Interrupting(ggn, 10**9)
    plain = {key: value for key, value in OPTIONS.items() if key != "checkpoint_every"}
    uninterrupted = lanczos(counting, 2, **plain)
    resumed = run.pop("resumed")
    results.update(run)
    results["identical"] = (
        np.array_equal(resumed.eigenvalues, uninterrupted.eigenvalues)
        and np.array_equal(resumed.residuals, uninterrupted.residuals)
        and torch.equal(resumed.eigenvectors, uninterrupted.eigenvectors)
    )
    results["uninterrupted_products"] = counting.count
    dist.barrier()
    results["files"] = sorted(entry.name for entry in folder.iterdir())

    # save clocks that differ between ranks: every rank still saves at the same steps
    mixed_path = folder / "mixed.pt"
    mixed_options = dict(plain)
    if rank == 1:
        mixed_options["checkpoint_seconds"] = 1e-9  # due at every save point
    else:
        mixed_options["checkpoint_every"] = 3
    mixed = interrupted_then_resumed(ggn, mixed_path, **mixed_options)
    results["mixed_saved"] = mixed["saved"]
    results["mixed_identical"] = np.array_equal(
        mixed["resumed"].eigenvalues, uninterrupted.eigenvalues
    ) and torch.equal(mixed["resumed"].eigenvectors, uninterrupted.eigenvectors)

    # tampered and missing rank files: refused on every rank
    own, second = rank_path(path, rank, world), rank_path(path, 1, world)
    good = folder / f"good{rank}"
    shutil.copy(own, good)

    def tampered(change: Callable[[], Any]) -> str | None:
        dist.barrier()
        if rank == 0:
            change()
        dist.barrier()
        message = refusal(lambda: lanczos(Interrupting(ggn, 10**9), 2, checkpoint=path, **OPTIONS))
        dist.barrier()
        shutil.copy(good, own)  # every rank restores its own file
        return message

    results["copied_rank"] = tampered(lambda: shutil.copy(rank_path(path, 0, world), second))
    results["other_run"] = tampered(lambda: shutil.copy(rank_path(mixed_path, 1, world), second))
    early = folder / "early1"  # rank 1's file at the save point before the preemption
    results["older_copy"] = tampered(lambda: shutil.copy(early, second))
    results["missing"] = tampered(second.unlink)
    save_results(results, out, rank)


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=LAUNCH_TIMEOUT_S)


# ----------------------------------------------------------------------------- parent side
def launch(world: int, folder: Path, out: Path, scenario: str) -> list[dict[str, Any]]:
    out.mkdir()
    (out / "folder").write_text(str(folder))
    (out / "scenario").write_text(scenario)
    return run_ranks(__file__, world, out, LAUNCH_TIMEOUT_S, f"{world} ranks ({scenario})")


@pytest.mark.parametrize(("world", "other_world"), [(2, 4), (4, 2)])
def test_sharded_checkpoint_resume_and_refusals(
    world: int, other_world: int, tmp_path: Path
) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    per_rank = launch(world, folder, tmp_path / "run", "resume")
    run_ids = {results["saved"]["run_id"] for results in per_rank}
    assert len(run_ids) == 1, "the ranks' files carry different run ids"
    for rank, results in enumerate(per_rank):
        where = f"rank {rank} of {world}"
        assert results["preempted"] and results["identical"], where
        saved = results["saved"]
        assert (saved["world_size"], saved["rank"]) == (world, rank), where
        assert 0 < saved["num_matvecs"] <= STOP_AFTER, where
        assert saved["num_matvecs"] == per_rank[0]["saved"]["num_matvecs"], where
        assert (
            results["resumed_products"] + saved["num_matvecs"] == results["uninterrupted_products"]
        ), where
        assert "lanczos.pt" not in results["files"], "a sharded run wrote the unsharded file"
        assert {f"lanczos.pt.rank{r}-of-{world}" for r in range(world)} <= set(results["files"])
        mixed = [r["mixed_saved"]["num_matvecs"] for r in per_rank]
        assert len(set(mixed)) == 1, f"ranks saved at different steps: {mixed}"
        assert results["mixed_identical"], where

    def refused(key: str, *needles: str) -> None:
        for rank, results in enumerate(per_rank):
            message = results[key]
            assert message is not None, f"{key}: rank {rank} resumed"
            for needle in needles:
                assert needle in message, f"{key} on rank {rank}: {message}"

    refused("copied_rank", f"rank1-of-{world}")
    refused("other_run", "different runs")
    refused("older_copy", "different points", "rank 1 after")
    refused("missing", "lacks the file of rank(s) [1]")

    other = launch(other_world, folder, tmp_path / "other", "other_world")
    for rank, results in enumerate(other):
        message = results["other_world"]
        assert message is not None, f"rank {rank} of {other_world} resumed {world}-rank files"
        assert f"over {world} ranks" in message, message
        assert f"this run has {other_world} ranks" in message, message


def test_unsharded_run_keeps_one_file_and_its_format(tmp_path: Path) -> None:
    """A local run's checkpoint is the given path, with the keys of format version 1 only."""
    generator = torch.Generator().manual_seed(0)
    half = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    path = tmp_path / "local.pt"
    lanczos(half + half.T, 2, seed=0, checkpoint=path, checkpoint_every=2)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["local.pt"]
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {
        "format", "version", "solver", "options", "fingerprint", "num_matvecs", "state"
    }  # fmt: skip
    assert payload["version"] == 1
