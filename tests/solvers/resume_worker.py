"""Solver jobs for the kill-and-resume test, and a fork server that runs them in child processes
that SIGKILL themselves at a chosen point.

Run as a script it is the fork server: it imports torch once (one intra-op thread, so results
match the test process bit for bit), then for each JSON command on stdin forks a child that runs
one job with a checkpoint and kills itself with SIGKILL after its ``kill_at``-th product (counted
in that child) or in the middle of writing its ``kill_in_save``-th checkpoint (half the bytes on
disk, before the rename). It answers each command with a JSON line: the child's signal and exit
code. Imported (by path) from the test, it provides the same jobs for the in-process runs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import HessianOperator, supervised_loss
from torch_linop.solvers import diagonal, lanczos, power_iteration, spectral_density, trace

SIZE = 36


def test_matrix() -> torch.Tensor:
    """A float64 symmetric matrix with a decaying top, a separated bottom and a bulk
    (deterministic)."""
    rng = np.random.default_rng(7)
    ends = np.concatenate([np.geomspace(2, 60, 8), -np.geomspace(3, 40, 4)])
    eigenvalues = np.concatenate([ends, rng.uniform(-1, 1, SIZE - len(ends))])
    orthogonal, _ = np.linalg.qr(rng.standard_normal((SIZE, SIZE)))
    matrix = (orthogonal * eigenvalues) @ orthogonal.T
    return torch.from_numpy((matrix + matrix.T) / 2)


def mlp_hessian() -> HessianOperator:
    """The Hessian of a tiny float64 tanh MLP (47 parameters) on fixed data."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    generator = torch.Generator().manual_seed(4)
    data = [
        (
            torch.randn(size, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 2, (size,), generator=generator),
        )
        for size in (6, 4)
    ]
    return HessianOperator(model, data, supervised_loss(F.cross_entropy))


class CountingOperator:
    """Torch-path operator around ``inner`` that calls ``on_product(count)`` after each product
    (count = columns multiplied so far in this process)."""

    def __init__(self, inner: Any, on_product: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.device, self.torch_dtype, self.shape = inner.device, inner.torch_dtype, inner.shape
        # what identifies the operator in a checkpoint: the inner operator's own description
        # (parameter checksums, no product), else the solvers take a probe product
        self.fingerprint = getattr(inner, "fingerprint", None)
        self.count = 0
        self.on_product = on_product

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        product = self.inner @ block
        self.count += block.shape[1]
        if self.on_product is not None:
            self.on_product(self.count)
        return product


class DenseOperator:
    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.device, self.torch_dtype, self.shape = matrix.device, matrix.dtype, matrix.shape

    def __matmul__(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block


def operator_for(job: str) -> Any:
    return mlp_hessian() if job == "lanczos_hessian" else DenseOperator(test_matrix())


# name -> solver call on an operator, with the checkpoint keyword arguments passed through
JOBS: dict[str, Callable[..., Any]] = {
    "lanczos_hessian": lambda op, **kw: lanczos(op, 3, seed=1, max_basis=10, tol=1e-11, **kw),
    "lanczos_block": lambda op, **kw: lanczos(
        op, 4, which="BE", block_size=2, seed=2, max_basis=14, tol=1e-11, **kw
    ),
    # measured residuals: their products and schedule are part of the saved state too
    "lanczos_verified": lambda op, **kw: lanczos(
        op, 3, which="LA", seed=10, max_basis=10, tol=1e-11, verify=True, **kw
    ),
    "spectral_density": lambda op, **kw: spectral_density(
        op, num_runs=3, lanczos_steps=10, grid_size=50, seed=3, **kw
    ),
    "hutch++": lambda op, **kw: trace(op, 30, seed=4, block_size=4, **kw),
    "xtrace": lambda op, **kw: trace(op, 24, method="xtrace", seed=5, block_size=5, **kw),
    "hutchinson": lambda op, **kw: trace(op, 20, method="hutchinson", seed=6, block_size=3, **kw),
    "diagonal": lambda op, **kw: diagonal(op, 20, seed=7, block_size=3, **kw),
    "xdiag": lambda op, **kw: diagonal(op, 24, method="xdiag", seed=8, block_size=4, **kw),
    "power_iteration": lambda op, **kw: power_iteration(op, k=2, seed=9, max_iter=25, **kw),
}


def _kill_self(*_: Any) -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_written_save(real_save: Callable[..., None], target: int) -> Callable[..., None]:
    """A ``torch.save`` that writes half the bytes of its ``target``-th call and dies."""
    calls = [0]

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] < target:
            real_save(obj, file, *args, **kwargs)
            return
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        _kill_self()

    return save


def run_child(command: dict[str, Any], operators: dict[str, Any]) -> None:
    """In the forked child: run the job with its checkpoint until the planned SIGKILL."""
    kill_at = command.get("kill_at")
    kill_in_save = command.get("kill_in_save")

    def on_product(count: int) -> None:
        if kill_at is not None and count >= kill_at:
            _kill_self()

    if kill_in_save is not None:
        torch.save = _half_written_save(torch.save, kill_in_save)  # type: ignore[assignment]
    operator = CountingOperator(operators[command["job"]], on_product)
    JOBS[command["job"]](operator, checkpoint=command["checkpoint"], checkpoint_every=1)


def serve() -> None:
    torch.set_num_threads(1)
    operators = {job: operator_for(job) for job in JOBS}
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                run_child(command, operators)
            except BaseException as error:  # reported through the exit code
                print(f"child error: {error!r}", file=sys.stderr)
                status = 1
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        answer = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
