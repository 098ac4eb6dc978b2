"""Kill-and-resume: every checkpointing solver, SIGKILLed in a child process at random points
(after a product, and in the middle of writing a checkpoint), resumes to results bit-identical
(``==``) to an uninterrupted run with the same seed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

WORKER_PATH = Path(__file__).with_name("resume_worker.py")
_spec = importlib.util.spec_from_file_location("resume_worker", WORKER_PATH)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


class ForkServer:
    """The worker script in a fresh interpreter; ``run(command)`` forks one child per call."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_PATH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the fork server died"
        return json.loads(answer)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def fork_server():
    server = ForkServer()
    yield server
    server.close()


def assert_identical(resumed: Any, reference: Any) -> None:
    """Every field of two result records equal with ``==`` (arrays elementwise, all of them)."""
    for field in dataclasses.fields(reference):
        mine, theirs = getattr(resumed, field.name), getattr(reference, field.name)
        if isinstance(theirs, torch.Tensor):
            assert mine.dtype == theirs.dtype and bool((mine == theirs).all()), field.name
        elif isinstance(theirs, np.ndarray):
            assert mine.shape == theirs.shape and bool((mine == theirs).all()), field.name
        else:
            assert mine == theirs, field.name


def temporaries(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def first_saved_product(job: str, path: Path) -> int:
    """The first product count at which the job's checkpoint file exists (in-process run)."""
    seen: list[int] = []

    def on_product(count: int) -> None:
        if not seen and path.exists():
            seen.append(count)

    operator = worker.CountingOperator(worker.operator_for(job), on_product)
    worker.JOBS[job](operator, checkpoint=path, checkpoint_every=1)
    path.unlink()
    return seen[0]


@pytest.mark.parametrize("job", list(worker.JOBS))
def test_sigkilled_runs_resume_bit_identically(fork_server, job, tmp_path):
    solve = worker.JOBS[job]
    reference_operator = worker.CountingOperator(worker.operator_for(job))
    reference = solve(reference_operator)
    total = reference_operator.count
    assert total >= 12
    checkpoint = tmp_path / "run.pt"
    rng = random.Random(job)  # different kill points for every job, reproducible

    # 1. killed after a random product once the first checkpoint is written
    saved_from = first_saved_product(job, checkpoint)
    first_kill = rng.randint(saved_from, max(saved_from, total // 2))
    answer = fork_server.run(job=job, checkpoint=str(checkpoint), kill_at=first_kill)
    assert answer["signal"] == signal.SIGKILL, answer
    assert checkpoint.exists()
    # 2. resumed, and killed again a random number of products later
    second_kill = rng.randint(2, max(2, (total - first_kill) // 2))
    answer = fork_server.run(job=job, checkpoint=str(checkpoint), kill_at=second_kill)
    assert answer["signal"] == signal.SIGKILL, answer
    # 3. resumed, and killed half-way through writing a checkpoint: the good one survives
    answer = fork_server.run(job=job, checkpoint=str(checkpoint), kill_in_save=rng.randint(1, 3))
    assert answer["signal"] == signal.SIGKILL, answer
    assert len(temporaries(checkpoint)) == 1  # the half-written file, never renamed
    # 4. resumed here to the end
    operator = worker.CountingOperator(worker.operator_for(job))
    resumed = solve(operator, checkpoint=checkpoint, checkpoint_every=1)
    assert operator.count < total  # it continued from the checkpoint instead of starting over
    assert temporaries(checkpoint) == []  # the dead writer's temporary file was removed
    assert_identical(resumed, reference)


def test_checkpointing_does_not_change_the_numbers(tmp_path):
    """Saving at every product or never gives the same result; a finished run resumed from
    its last checkpoint repeats only the products after it."""
    for job in ("lanczos_block", "hutch++", "spectral_density"):
        solve = worker.JOBS[job]
        plain = solve(worker.DenseOperator(worker.test_matrix()))
        path = tmp_path / f"{job}.pt"
        saved = solve(
            worker.DenseOperator(worker.test_matrix()), checkpoint=path, checkpoint_every=1
        )
        assert_identical(saved, plain)
        again = solve(
            worker.DenseOperator(worker.test_matrix()), checkpoint=path, checkpoint_every=1
        )
        assert_identical(again, plain)


@pytest.mark.parametrize("job", list(worker.JOBS))
def test_resuming_from_every_save_point_is_bit_identical(job, tmp_path):
    """One run saving after every product, each of its checkpoints kept; a run resumed from any
    of them (what an interruption anywhere before the next save leaves) equals the
    uninterrupted run. The first interruption is a KeyboardInterrupt inside a product."""
    solve = worker.JOBS[job]
    reference_operator = worker.CountingOperator(worker.operator_for(job))
    reference = solve(reference_operator)
    path = tmp_path / "run.pt"
    copies: list[Path] = []
    last_bytes = [b""]

    def keep_checkpoints(count: int) -> None:
        if path.exists() and path.read_bytes() != last_bytes[0]:
            last_bytes[0] = path.read_bytes()
            copies.append(tmp_path / f"copy{len(copies)}.pt")
            copies[-1].write_bytes(last_bytes[0])
        if count >= reference_operator.count // 2 and not interrupted:
            interrupted.append(count)
            raise KeyboardInterrupt

    interrupted: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        solve(
            worker.CountingOperator(worker.operator_for(job), keep_checkpoints),
            checkpoint=path,
            checkpoint_every=1,
        )
    solve(
        worker.CountingOperator(worker.operator_for(job), keep_checkpoints),
        checkpoint=path,
        checkpoint_every=1,
    )
    keep_checkpoints(-1)  # the last save
    assert len(copies) >= 5
    for copy in copies:
        operator = worker.CountingOperator(worker.operator_for(job))
        resumed = solve(operator, checkpoint=copy, checkpoint_every=10**9)
        # only the products after the save, plus the fingerprint's probe product for operators
        # that do not describe themselves with fingerprint()
        saved = torch.load(copy, weights_only=True)["num_matvecs"]
        probe = 0 if operator.fingerprint is not None else 1
        assert operator.count == reference_operator.count - saved + probe
        assert_identical(resumed, reference)
