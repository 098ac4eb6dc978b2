"""``lanczos(check_every=c)``: convergence checked every ``c`` block steps instead of on the
adaptive schedule. With ``c=1`` a run stops at the first step whose Ritz residuals meet ``tol``:
checked against a dense Rayleigh-Ritz oracle (an orthonormal basis of the block Krylov space
built here in numpy, true residuals ``||A x - theta x||`` from the dense matrix), counting
every product. The default schedule and checkpoints written without the option are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_linop.solvers import lanczos


class CountingOperator:
    """A dense float64 tensor on the torch path that counts every column it multiplies."""

    def __init__(self, matrix: np.ndarray, interrupt_after: int | None = None) -> None:
        self.matrix = torch.from_numpy(matrix)
        self.device, self.torch_dtype = self.matrix.device, self.matrix.dtype
        self.shape = tuple(self.matrix.shape)
        self.num_matvecs = 0
        self.interrupt_after = interrupt_after

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += block.shape[1]
        if self.interrupt_after is not None and self.num_matvecs > self.interrupt_after:
            raise KeyboardInterrupt
        return self.matrix @ block

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matmat(other if other.dim() == 2 else other[:, None]).reshape(other.shape)


def first_converged_step(
    matrix: np.ndarray, start: np.ndarray, k: int, tol: float
) -> tuple[int, np.ndarray, list[float]]:
    """The oracle: for m = 1, 2, ... Rayleigh-Ritz on span{S, A S, ..., A^(m-1) S}; the first m
    whose top-k (largest algebraic) true residuals are all <= tol * max |theta|, its top-k Ritz
    values, and the worst residual / threshold ratio at every m up to it."""
    basis, _ = np.linalg.qr(start)
    block = basis
    ratios: list[float] = []
    for steps in range(1, matrix.shape[0] // start.shape[1]):
        projected = basis.T @ matrix @ basis
        values, coordinates = np.linalg.eigh((projected + projected.T) / 2)
        top = np.argsort(values)[::-1][:k]
        vectors = basis @ coordinates[:, top]
        residuals = np.linalg.norm(matrix @ vectors - vectors * values[top], axis=0)
        ratio = float(residuals.max() / (tol * np.abs(values).max()))
        ratios.append(ratio)
        if ratio <= 1:
            return steps, np.sort(values[top])[::-1], ratios
        block = matrix @ block
        for _ in range(2):  # full reorthogonalisation, twice
            block = block - basis @ (basis.T @ block)
        block, _ = np.linalg.qr(block)
        basis = np.hstack([basis, block])
    raise AssertionError("the oracle did not converge")


@pytest.fixture(scope="module")
def geometric(make_matrix) -> np.ndarray:
    return make_matrix(np.geomspace(1.0, 1e-4, 80) * np.where(np.arange(80) % 7 == 3, -1, 1), 11)


@pytest.fixture(scope="module")
def gapped(make_matrix) -> np.ndarray:
    """Three separated top eigenvalues over a bulk in [-2, 2]: warm starts converge in a few
    steps, where the adaptive schedule (first check after 2 steps, the next 4 later) overshoots."""
    bulk = np.random.default_rng(0).uniform(-2, 2, 77)
    return make_matrix(np.concatenate([[20.0, 15.0, 12.0], bulk]), 11)


def warm_start(matrix: np.ndarray, block_size: int, noise: float) -> np.ndarray:
    """The top ``block_size`` eigenvectors plus ``noise`` times a random unit-scale block."""
    values, vectors = np.linalg.eigh(matrix)
    top = vectors[:, np.argsort(values)[::-1][:block_size]]
    rng = np.random.default_rng(3)
    return top + noise * rng.standard_normal(top.shape) / np.sqrt(len(matrix))


@pytest.mark.parametrize(
    ("k", "block_size", "tol", "noise"),
    [(1, 1, 1e-4, 1e-2), (1, 1, 1e-3, 1e-1), (2, 2, 1e-4, 1e-2)],
)
def test_check_every_step_stops_at_the_first_converged_step(gapped, k, block_size, tol, noise):
    start = warm_start(gapped, block_size, noise)
    steps, oracle_values, ratios = first_converged_step(gapped, start, k, tol)
    # the test means something only if the stopping step is not a rounding coin flip
    assert ratios[-1] < 0.95 and all(ratio > 1.05 for ratio in ratios[:-1])
    operator = CountingOperator(gapped)
    result = lanczos(
        operator,
        k,
        which="LA",
        tol=tol,
        block_size=block_size,
        start_block=torch.from_numpy(start),
        check_every=1,
    )
    assert result.converged.all()
    assert operator.num_matvecs == result.num_matvecs == steps * block_size
    truth = np.sort(np.linalg.eigvalsh(gapped))[::-1][:k]
    np.testing.assert_allclose(result.eigenvalues, oracle_values, rtol=1e-10)
    # the eigenvalue error is bounded by the residual tolerance times ||A|| (= 20)
    np.testing.assert_allclose(result.eigenvalues, truth, atol=tol * 20)
    # and the default schedule, checking less often, pays for steps past convergence here
    adaptive = lanczos(
        gapped, k, which="LA", tol=tol, block_size=block_size, start_block=torch.from_numpy(start)
    )
    assert adaptive.num_matvecs > result.num_matvecs


def test_check_every_c_stops_at_the_next_multiple_of_c(geometric):
    start = np.random.default_rng(4).standard_normal((geometric.shape[0], 1))
    steps, _, ratios = first_converged_step(geometric, start, 1, 1e-8)
    assert all(ratio > 1.05 for ratio in ratios[:-1]) and ratios[-1] < 0.95
    for every in (2, 3, 5):
        operator = CountingOperator(geometric)
        result = lanczos(
            operator,
            1,
            which="LA",
            tol=1e-8,
            start_block=torch.from_numpy(start),
            check_every=every,
        )
        assert result.num_matvecs == operator.num_matvecs == every * -(-steps // every)


def test_default_schedule_is_unchanged_and_never_cheaper(geometric):
    """``check_every=None`` is the default; the adaptive schedule checks less often, so it never
    stops before the step-by-step one, and both find the same eigenvalues."""
    start = torch.from_numpy(np.random.default_rng(5).standard_normal((geometric.shape[0], 2)))
    runs = {}
    for name, extra in {
        "default": {},
        "none": {"check_every": None},
        "every": {"check_every": 1},
    }.items():
        operator = CountingOperator(geometric)
        runs[name] = lanczos(operator, 2, tol=1e-8, block_size=2, start_block=start, **extra)
    assert runs["default"].num_matvecs == runs["none"].num_matvecs
    np.testing.assert_array_equal(runs["default"].eigenvalues, runs["none"].eigenvalues)
    assert runs["every"].num_matvecs <= runs["default"].num_matvecs
    truth = np.sort(np.abs(np.linalg.eigvalsh(geometric)))[::-1][:2]
    for result in runs.values():
        np.testing.assert_allclose(np.abs(result.eigenvalues), truth, atol=1e-8)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_check_every_must_be_a_positive_int(geometric, bad):
    with pytest.raises((TypeError, ValueError), match="check_every"):
        lanczos(CountingOperator(geometric), 1, check_every=bad)


def test_checkpoints_record_check_every_only_when_set(geometric, tmp_path):
    """A checkpoint written without ``check_every`` (as before the option) has no such entry, so
    older files resume; one written with it resumes bit-identically with it, and refuses
    another setting."""
    plain = tmp_path / "plain.pt"
    lanczos(CountingOperator(geometric), 1, tol=1e-8, seed=0, checkpoint=plain, checkpoint_every=1)
    assert "check_every" not in torch.load(plain, weights_only=False)["options"]

    reference = lanczos(CountingOperator(geometric), 2, tol=1e-9, seed=1, check_every=1)
    path = tmp_path / "every.pt"
    with pytest.raises(KeyboardInterrupt):
        lanczos(
            CountingOperator(geometric, interrupt_after=reference.num_matvecs // 2),
            2,
            tol=1e-9,
            seed=1,
            check_every=1,
            checkpoint=path,
            checkpoint_every=1,
        )
    with pytest.raises(ValueError, match="check_every"):
        lanczos(CountingOperator(geometric), 2, tol=1e-9, seed=1, checkpoint=path)
    resumed = lanczos(
        CountingOperator(geometric), 2, tol=1e-9, seed=1, check_every=1, checkpoint=path
    )
    assert resumed.num_matvecs == reference.num_matvecs
    np.testing.assert_array_equal(resumed.eigenvalues, reference.eigenvalues)
    np.testing.assert_array_equal(resumed.eigenvectors, reference.eigenvectors)
