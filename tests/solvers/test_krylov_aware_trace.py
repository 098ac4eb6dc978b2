"""Krylov-aware trace estimation (``trace(..., method="krylov")``) against exact traces: unbiased
with an honest standard error on definite and indefinite matrices, exact once the Krylov space
holds the range, the budget spent exactly, more accurate than Hutch++ and XTrace at equal budget
on decaying spectra and on the Hessian of a trained MLP, checkpoints that resume bit-identically,
and the memory cap on the basis."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import HessianOperator, supervised_loss
from torch_linop.reference import dense_hessian
from torch_linop.solvers import TraceResult, chen2023krylov_aware, trace

# torch's forward-mode AD (dense_hessian) loads TorchScript decompositions on first use and warns
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)
WORKER_PATH = Path(__file__).with_name("resume_worker.py")
_spec = importlib.util.spec_from_file_location("resume_worker", WORKER_PATH)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def trained_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A 10-20-2 tanh MLP (262 parameters) after 100 full-batch Adam steps on a separable task:
    a Hessian with a few outliers over a small, partly negative bulk, as trained networks have."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(400, 10, generator=generator, dtype=torch.float64)
    labels = (inputs[:, :3].sum(dim=1) > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 2)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model, (inputs, labels)


@pytest.fixture(scope="module")
def mlp_hessian() -> np.ndarray:
    model, batch = trained_mlp()
    hessian = dense_hessian(model, [batch], supervised_loss(F.cross_entropy))
    return ((hessian + hessian.T) / 2).numpy()


@pytest.fixture(scope="module")
def indefinite(make_matrix) -> np.ndarray:
    rng = np.random.default_rng(40)
    spectrum = np.concatenate(
        [np.geomspace(1, 20, 6), -np.geomspace(1, 10, 4), rng.uniform(-1, 1, 110)]
    )
    return make_matrix(spectrum, seed=41)


def relative_errors(matrix: np.ndarray, method: str, num_matvecs: int, seeds: int) -> np.ndarray:
    exact = np.trace(matrix)
    estimates = [
        trace(matrix, num_matvecs, method=method, seed=seed).estimate for seed in range(seeds)
    ]
    return (np.array(estimates) - exact) / abs(exact)


def rms(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2)))


@pytest.mark.parametrize("name", ["wishart", "indefinite"])
def test_unbiased_with_an_honest_standard_error(name, test_matrices, indefinite):
    matrix = test_matrices["wishart"] if name == "wishart" else indefinite
    exact = np.trace(matrix)
    results = [trace(matrix, 30, method="krylov", seed=seed) for seed in range(100)]
    errors = np.array([r.estimate - exact for r in results])
    z_scores = errors / np.array([r.stderr for r in results])
    # 15 probes: z is t-distributed with 14 degrees of freedom (std 1.08); over 1000 seeds
    # std(z) was 1.11 (PSD) and 1.14 (indefinite), 3-sigma coverage 0.99, mean |z| < 0.1
    assert np.mean(np.abs(z_scores) < 3) >= 0.9
    assert 0.7 < z_scores.std() < 1.45
    assert abs(z_scores.mean()) < 0.35
    assert abs(errors.mean()) < 3.5 * errors.std() / np.sqrt(len(errors))


def test_exact_when_the_krylov_space_holds_the_range(make_matrix):
    """Rank 4 plus the start vector: the Krylov space is invariant after 5 steps; the steps after
    the breakdown go on in random directions orthogonal to it, and every deflated probe is 0."""
    low_rank = make_matrix(np.concatenate([[4.0, -3.0, 2.0, 1.0], np.zeros(46)]), seed=22)
    for budget in (12, 30):
        result = trace(low_rank, budget, method="krylov", seed=0)
        assert result.estimate == pytest.approx(4.0, abs=1e-10)
        assert result.stderr < 1e-8
        assert result.num_matvecs == budget
    # the Krylov space is the whole space (n = 10 Lanczos vectors): exact as well
    diagonal = np.diag(np.arange(1.0, 11.0))
    result = trace(diagonal, 20, method="krylov", seed=1)
    assert result.estimate == pytest.approx(55.0, rel=1e-12)
    assert result.stderr < 1e-8


def test_budget_is_spent_exactly(torch_operator, test_matrices):
    matrix = torch.from_numpy(test_matrices["negative"])
    for budget, block_size in [(4, None), (5, None), (31, None), (60, 7), (41, 1)]:
        op = torch_operator(matrix)
        result = trace(op, budget, method="krylov", seed=0, block_size=block_size)
        assert isinstance(result, TraceResult) and result.method == "krylov"
        assert result.num_matvecs == budget == op.num_matvecs


def test_split_between_lanczos_and_probes():
    assert chen2023krylov_aware.krylov_dimension(30, 1000, 1) == 15
    assert chen2023krylov_aware.krylov_dimension(31, 1000, 1) == 15
    assert chen2023krylov_aware.krylov_dimension(4, 1000, 1) == 2
    assert chen2023krylov_aware.krylov_dimension(20, 10, 1) == 10  # the whole space
    assert chen2023krylov_aware.krylov_dimension(30, 1000, 4) == 12  # whole blocks
    # room for the pending block of the last step: 2 blocks of 2 in 5 dimensions
    assert chen2023krylov_aware.krylov_dimension(10, 5, 2) == 2


# Ratios of RMS errors krylov / min(Hutch++, XTrace) over 2000 seeds (offline): 1/i 0.72 (30
# products) and 0.67 (60); 1/i^2 0.78 and 0.77; this MLP 0.66 and 0.80. The worst ratio over
# disjoint windows of those seeds was 0.92 (100-seed windows, 1/i^2) and 0.86 (150-seed windows,
# MLP), so 150 seeds and a 0.95 margin test the ordering, not luck.
@pytest.mark.parametrize("spectrum", ["1/i", "1/i^2", "mlp"])
def test_beats_hutchpp_and_xtrace_at_equal_budget(spectrum, make_matrix, mlp_hessian):
    size = 300
    if spectrum == "1/i":
        matrix = make_matrix(1.0 / np.arange(1, size + 1), seed=30)
    elif spectrum == "1/i^2":
        matrix = make_matrix(1.0 / np.arange(1, size + 1) ** 2, seed=31)
    else:
        matrix = mlp_hessian
    for budget in (30, 60):
        krylov = rms(relative_errors(matrix, "krylov", budget, 150))
        hutchpp = rms(relative_errors(matrix, "hutch++", budget, 150))
        xtrace = rms(relative_errors(matrix, "xtrace", budget, 150))
        assert krylov < 0.95 * min(hutchpp, xtrace), (spectrum, budget, krylov, hutchpp, xtrace)


def test_hessian_operator_gives_the_dense_matrix_estimate(mlp_hessian):
    """On the torch path with the real Hessian operator: the same probes as on the dense
    matrix, so the same estimate up to rounding, and within a few stderr of the exact trace."""
    model, batch = trained_mlp()
    operator = HessianOperator(model, [batch], supervised_loss(F.cross_entropy))
    result = trace(operator, 40, method="krylov", seed=3)
    dense = trace(mlp_hessian, 40, method="krylov", seed=3)
    assert result.num_matvecs == 40
    assert result.estimate == pytest.approx(dense.estimate, rel=1e-9)
    assert result.stderr == pytest.approx(dense.stderr, rel=1e-6)
    assert abs(result.estimate - np.trace(mlp_hessian)) < 4 * result.stderr


def test_resuming_from_every_save_point_is_bit_identical(tmp_path):
    """A run saving after every Lanczos step and probe block, each checkpoint kept; a run resumed
    from any of them repeats only the products after it and equals the uninterrupted run."""

    def solve(op, **kwargs):
        return trace(op, 24, method="krylov", seed=11, block_size=3, **kwargs)

    reference_operator = worker.CountingOperator(worker.DenseOperator(worker.test_matrix()))
    reference = solve(reference_operator)
    path = tmp_path / "run.pt"
    copies: list[Path] = []
    last_bytes = [b""]

    def keep_checkpoints(_count: int) -> None:
        if path.exists() and path.read_bytes() != last_bytes[0]:
            last_bytes[0] = path.read_bytes()
            copies.append(tmp_path / f"copy{len(copies)}.pt")
            copies[-1].write_bytes(last_bytes[0])

    saving = worker.CountingOperator(worker.DenseOperator(worker.test_matrix()), keep_checkpoints)
    saved_run = solve(saving, checkpoint=path, checkpoint_every=1)
    keep_checkpoints(-1)  # the last save
    assert (saved_run.estimate, saved_run.stderr) == (reference.estimate, reference.stderr)
    assert len(copies) >= 12 + 4  # 12 Lanczos steps, 4 blocks of probes
    for copy in copies:
        operator = worker.CountingOperator(worker.DenseOperator(worker.test_matrix()))
        resumed = solve(operator, checkpoint=copy, checkpoint_every=10**9)
        saved = torch.load(copy, weights_only=True)["num_matvecs"]
        # the products after the save, plus the fingerprint's probe product (no parameters)
        assert operator.count == reference_operator.count - saved + 1
        assert (resumed.estimate, resumed.stderr, resumed.num_matvecs) == (
            reference.estimate,
            reference.stderr,
            reference.num_matvecs,
        )


def test_basis_is_capped_to_free_device_memory(monkeypatch):
    """Where the basis would not fit (a GPU with little free memory, simulated), it is cut to
    what fits, the saved products go to probes and the budget is still spent exactly."""
    matrix = np.diag(1.0 / np.arange(1, 101))
    vector_bytes = 100 * 8
    monkeypatch.setattr(chen2023krylov_aware, "device_budget", lambda device: 10 * vector_bytes)
    with pytest.warns(RuntimeWarning, match="holds 7 vectors instead of 20"):
        result = trace(matrix, 40, method="krylov", seed=0)
    assert result.num_matvecs == 40
    assert abs(result.estimate - np.trace(matrix)) < 5 * result.stderr


def test_input_errors(test_matrices):
    matrix = test_matrices["wishart"][:10, :10]
    with pytest.raises(ValueError, match="method 'krylov' needs num_matvecs >= 4"):
        trace(matrix, 3, method="krylov")
    with pytest.raises(ValueError, match="more than the operator size n=10"):
        trace(matrix, 22, method="krylov")
    with pytest.raises(FloatingPointError, match="non-finite"):
        trace(matrix * np.nan, 10, method="krylov")
