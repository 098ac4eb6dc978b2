"""The solver protocol: ``solvers/`` imports nothing from ``torch_linop``; an operator's
``vector_space`` is where every solver takes its inner products, norms and probes (a space whose
rows hold the entries in another order gives the numbers of the plain matrix); operators describe
themselves for checkpoints with ``fingerprint()``."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import GGNOperator, HessianOperator, supervised_loss
from torch_linop.solvers import (
    checkpoint as checkpoint_module,
)
from torch_linop.solvers import (
    diagonal,
    lanczos,
    power_iteration,
    spectral_density,
    trace,
)
from torch_linop.solvers._operator import as_operator

SOLVERS = Path(__file__).resolve().parents[2] / "solvers"
SIZE = 12
SPLIT = 5  # the permuted space holds entries [SPLIT, n) first, then [0, SPLIT)


def imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def test_solvers_import_nothing_from_torch_linop() -> None:
    files = sorted(SOLVERS.glob("*.py"))
    assert len(files) > 10  # the package was found
    offending = {
        path.name: [name for name in imported_modules(path) if name.split(".")[0] == "torch_linop"]
        for path in files
    }
    assert not {name: found for name, found in offending.items() if found}, offending


def spd_matrix() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    orthogonal, _ = torch.linalg.qr(
        torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64)
    )
    spectrum = torch.linspace(0.1, 1.0, SIZE, dtype=torch.float64) ** 3 * 10
    return (orthogonal * spectrum) @ orthogonal.T


class PermutedSpace:
    """Whole vectors whose rows hold entries ``[SPLIT, n)`` then ``[0, SPLIT)``; counts the
    reductions the solvers ask for."""

    def __init__(self) -> None:
        self.calls = {"inner": 0, "reduce": 0, "qr": 0, "seed": 0}

    def local_entries(self) -> list[tuple[int, int]]:
        return [(SPLIT, SIZE), (0, SPLIT)]

    def inner(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls["inner"] += 1
        return x.T @ y

    def reduce(self, partial: torch.Tensor, op: str) -> torch.Tensor:
        self.calls["reduce"] += 1
        return partial

    def qr(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["qr"] += 1
        return torch.linalg.qr(block)

    def shared_seed(self, seed: Any) -> Any:
        self.calls["seed"] += 1
        return seed


ORDER = torch.cat([torch.arange(SPLIT, SIZE), torch.arange(SPLIT)])


class PermutedOperator:
    """The matrix acting on vectors whose rows are in :data:`ORDER`."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix[ORDER][:, ORDER]
        self.shape, self.device, self.torch_dtype = matrix.shape, matrix.device, matrix.dtype
        self.vector_space = PermutedSpace()

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block


def unpermute(rows: torch.Tensor) -> torch.Tensor:
    """Vectors (along the last dim) from the permuted row order back to entry order."""
    result = torch.empty_like(rows)
    result[..., ORDER] = rows
    return result


def test_every_solver_goes_through_the_space_and_sees_the_same_vectors() -> None:
    matrix = spd_matrix()
    runs = {
        "lanczos": lambda op: lanczos(op, 3, seed=0),
        "block_lanczos": lambda op: lanczos(op, 2, block_size=2, seed=1),
        "power": lambda op: power_iteration(op, k=1, seed=2, max_iter=400),
        "hutch++": lambda op: trace(op, 9, seed=3),
        "xtrace": lambda op: trace(op, 8, method="xtrace", seed=4),
        "krylov": lambda op: trace(op, 8, method="krylov", seed=5),
        "diagonal": lambda op: diagonal(op, 6, seed=6),
        "xdiag": lambda op: diagonal(op, 6, method="xdiag", seed=7),
        "density": lambda op: spectral_density(op, num_runs=2, lanczos_steps=5, seed=8),
    }
    for name, run in runs.items():
        plain = run(matrix)
        permuted_op = PermutedOperator(matrix)
        permuted = run(permuted_op)
        calls = permuted_op.vector_space.calls
        assert calls["seed"] == 1 and calls["inner"] + calls["reduce"] > 0, (name, calls)
        if hasattr(plain, "eigenvalues"):
            np.testing.assert_allclose(permuted.eigenvalues, plain.eigenvalues, rtol=1e-10)
            vectors = unpermute(permuted.eigenvectors)
            signs = torch.sign((vectors * plain.eigenvectors).sum(dim=1, keepdim=True))
            torch.testing.assert_close(vectors * signs, plain.eigenvectors, rtol=0, atol=1e-8)
        elif hasattr(plain, "density"):
            np.testing.assert_allclose(permuted.nodes, plain.nodes, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(permuted.weights, plain.weights, rtol=1e-9, atol=1e-12)
        elif isinstance(plain.estimate, torch.Tensor):  # a diagonal, in the permuted rows
            torch.testing.assert_close(unpermute(permuted.estimate), plain.estimate)
            torch.testing.assert_close(unpermute(permuted.stderr), plain.stderr)
        else:
            assert abs(permuted.estimate - plain.estimate) <= 1e-10 * abs(plain.estimate), name
            assert abs(permuted.stderr - plain.stderr) <= 1e-8 * abs(plain.estimate), name


def test_a_space_without_the_required_methods_is_refused() -> None:
    operator = PermutedOperator(spd_matrix())
    operator.vector_space = object()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"lacks \['inner', 'shared_seed'\]"):
        trace(operator, 6, seed=0)
    bad = PermutedOperator(spd_matrix())
    bad.vector_space.local_entries = lambda: [(0, SIZE + 1)]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"outside the operator's 12 entries"):
        trace(bad, 6, seed=0)

    class HalfSpace:  # holds half of every vector but cannot combine the halves
        def inner(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x.T @ y

        def shared_seed(self, seed: Any) -> Any:
            return seed

        def local_entries(self) -> list[tuple[int, int]]:
            return [(0, SIZE // 2)]

    partial = PermutedOperator(spd_matrix())
    partial.vector_space = HalfSpace()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"holds 6 of the 12 entries .* lacks reduce"):
        trace(partial, 6, seed=0)


def test_a_seed_hook_that_replaces_none_makes_the_run_reproducible() -> None:
    operator = PermutedOperator(spd_matrix())
    operator.vector_space.shared_seed = lambda seed: 11 if seed is None else seed  # type: ignore[method-assign]
    first = trace(operator, 9, seed=None).estimate
    assert trace(operator, 9, seed=None).estimate == first == trace(operator, 9, seed=11).estimate


def tiny_model_and_data() -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    inputs = torch.randn(6, 3, dtype=torch.float64)
    return model, [(inputs, torch.randint(0, 2, (6,)))]


def test_operators_describe_themselves_for_checkpoints() -> None:
    model, data = tiny_model_and_data()
    loss = supervised_loss(F.cross_entropy)
    exact = HessianOperator(model, data, loss)
    described = exact.fingerprint()
    assert described["type"] == "HessianOperator"
    assert described["the shape of parameter '0.weight'"] == [4, 3]
    norm = float(model[0].weight.detach().norm())
    assert described["the values of parameter '0.weight'"][0] == pytest.approx(norm, rel=1e-14)

    def fingerprint(op: Any) -> dict[str, Any]:
        return checkpoint_module.fingerprint(op, as_operator(op))

    mismatch = checkpoint_module.fingerprint_mismatch
    assert mismatch(fingerprint(exact), fingerprint(HessianOperator(model, data, loss))) is None
    other_method = HessianOperator(model, data, loss, method="finite_difference")
    assert "method 'autograd' in the checkpoint, 'finite_difference' now" in mismatch(
        fingerprint(exact), fingerprint(other_method)
    )
    assert "type 'HessianOperator'" in mismatch(
        fingerprint(exact), fingerprint(GGNOperator(model, data, loss))
    )
    before = fingerprint(exact)
    with torch.no_grad():
        model[2].bias.neg_()  # a sign flip keeps every norm: the shifted sum sees it
    flipped = HessianOperator(model, data, loss)
    assert "the values of parameter '2.bias' differ" in mismatch(before, fingerprint(flipped))


def test_a_fingerprint_replaces_the_probe_product_and_must_be_json_data() -> None:
    matrix = spd_matrix()

    class Described:
        shape, device, torch_dtype = matrix.shape, matrix.device, matrix.dtype

        def __init__(self, label: Any) -> None:
            self.label, self.products = label, 0

        def matmat(self, block: torch.Tensor) -> torch.Tensor:
            self.products += block.shape[1]
            return matrix @ block

        def fingerprint(self) -> dict[str, Any]:
            return {"label": self.label, "scale": (1.0, 2)}

    operator = Described("a")
    record = checkpoint_module.fingerprint(operator, as_operator(operator))
    assert operator.products == 0 and record["operator"] == {"label": "a", "scale": [1.0, 2]}
    other = Described("b")
    assert "label 'a' in the checkpoint, 'b' now" in checkpoint_module.fingerprint_mismatch(
        record, checkpoint_module.fingerprint(other, as_operator(other))
    )
    with pytest.raises(TypeError, match="an operator fingerprint holds Tensor"):
        bad = Described(torch.zeros(1))
        checkpoint_module.fingerprint(bad, as_operator(bad))
