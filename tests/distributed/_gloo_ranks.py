"""Shared by the multi-process tests of tests/distributed: the toy classifier and its data, and
the launch of gloo ranks.

Each test file runs as a script in its rank processes (``python test_x.py RANK WORLD OUT``):
the ranks rendezvous through a file store in ``OUT``, write their results to ``OUT/rankR.pt``
with ``torch.save``, and the assertions run in the pytest process. Rank processes import this
module from the script's own folder (``sys.path[0]``); the pytest process, which imports the test
files with ``--import-mode=importlib``, needs that folder put on ``sys.path`` by the test file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


# ----------------------------------------------------------------------------- the problem
def make_model() -> nn.Sequential:
    """A 4-5-3 tanh classifier in float64 (43 parameters), initialised from seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_sharded_model() -> nn.Sequential:
    """:func:`make_model` under FSDP2: every linear layer and the root sharded (in a rank)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def classification_batches(sizes: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of 4 float64 features and labels in ``0..2`` per size, from generator seed 1."""
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for size in sizes
    ]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Single-threaded torch for the pytest process's references: the ranks share the machine's
    cores, and threads only add overhead on matrices this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- rank side
def init_gloo(rank: int, world: int, out: Path, timeout_s: float) -> None:
    """Join the gloo group of ``world`` ranks through the file store ``out / "store"``."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def exit_cleanly() -> None:
    """Barrier, destroy the group, and skip C++ static destructors: gloo's threads otherwise
    sometimes abort the interpreter at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_results(results: dict[str, Any], out: Path, rank: int) -> None:
    torch.save(results, out / f"rank{rank}.pt")


def run_rank(worker: Callable[[int, int, Path], None], group_timeout_s: float) -> None:
    """The body of a test file's ``__main__``: one thread, join the group named by
    ``sys.argv`` (``RANK WORLD OUT``), run ``worker(rank, world, out)``, exit cleanly. An
    exception from ``worker`` ends the process with its traceback (a non-zero exit)."""
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)  # several ranks share the machine's cores
    init_gloo(rank, world, out, group_timeout_s)
    worker(rank, world, out)
    exit_cleanly()


# ----------------------------------------------------------------------------- pytest side
def start_ranks(script: str, world: int, out: Path) -> list[subprocess.Popen[str]]:
    """Start ``world`` processes running ``script`` as ranks ``0..world-1`` writing to ``out``."""
    return [
        subprocess.Popen(
            [sys.executable, script, str(rank), str(world), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def wait_for_ranks(
    processes: list[subprocess.Popen[str]], timeout_s: float, what: str
) -> list[str]:
    """The ranks' stderr once all exited; kills them all and fails the test if they did not
    within ``timeout_s`` from now (a guard against hangs, not a time budget)."""
    deadline = time.monotonic() + timeout_s
    stderrs = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"{what} did not finish in {timeout_s} s")
        stderrs.append(stderr)
    return stderrs


def load_results(out: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def finish_ranks(
    processes: list[subprocess.Popen[str]], out: Path, timeout_s: float, what: str
) -> list[dict[str, Any]]:
    """Wait for started ranks (see ``wait_for_ranks``), require each to exit with 0, and return
    their results."""
    stderrs = wait_for_ranks(processes, timeout_s, what)
    for rank, (process, stderr) in enumerate(zip(processes, stderrs)):
        assert process.returncode == 0, f"rank {rank} of {len(processes)} failed:\n{stderr}"
    return load_results(out, len(processes))


def run_ranks(
    script: str, world: int, out: Path, timeout_s: float, what: str
) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``script`` to completion and return their results."""
    return finish_ranks(start_ranks(script, world, out), out, timeout_s, what)
