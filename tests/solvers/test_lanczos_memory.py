"""Lanczos' memory paths for bases that fill the device: Ritz vectors assembled on the host in
column chunks equal the ones formed on the device, and the true-residual check takes one
memory-sized block of Ritz vectors at a time."""

from __future__ import annotations

import numpy as np
import torch

from torch_linop.solvers import krylov, lanczos
from torch_linop.solvers._random import make_generator


def test_ritz_vectors_on_host_equal_the_device_ones(monkeypatch):
    rng = np.random.default_rng(0)
    n = 300
    matrix = torch.from_numpy(rng.standard_normal((n, n)))
    matrix = (matrix + matrix.T) / 2
    operator = krylov_operator(matrix)
    state = krylov.allocate(
        operator,
        n,
        2,
        capacity=40,
        generator=make_generator(0),
        basis_device=torch.device("cpu"),
        basis_dtype=torch.float64,
    )
    krylov.reset(state, torch.from_numpy(rng.standard_normal((n, 2))))
    for _ in range(10):
        krylov.step(state, operator)
    _, coordinates, _ = krylov.ritz(state)
    monkeypatch.setattr(krylov, "_HOST_COLUMN_CHUNK", 7)  # many ragged chunks
    on_host = krylov.ritz_vectors_on_host(state, coordinates[:, -4:])
    assert on_host.device.type == "cpu"
    torch.testing.assert_close(on_host, krylov.ritz_vectors(state, coordinates[:, -4:]))


def test_residuals_taken_a_block_at_a_time_are_the_true_ones(monkeypatch):
    from torch_linop.solvers import eigenpairs

    monkeypatch.setattr(eigenpairs, "default_block_size", lambda size, dtype: 1)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    matrix = torch.from_numpy((q * np.linspace(-1, 10, 200)) @ q.T)
    result = lanczos(matrix, 5, seed=0, tol=1e-8)
    vectors = result.eigenvectors.T  # rows are eigenvectors
    true = torch.linalg.vector_norm(
        matrix @ vectors - vectors * torch.from_numpy(result.eigenvalues), dim=0
    )
    np.testing.assert_allclose(result.residuals, true.numpy(), rtol=1e-6, atol=1e-12)
    assert result.converged.all()
    np.testing.assert_allclose(result.eigenvalues, np.linspace(-1, 10, 200)[::-1][:5], rtol=1e-10)


def krylov_operator(matrix: torch.Tensor):
    from torch_linop.solvers._operator import as_operator

    return as_operator(matrix)


def test_eigenvectors_assembled_on_the_host_when_they_do_not_fit(monkeypatch):
    from torch_linop.solvers import eigenpairs

    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    matrix = torch.from_numpy((q * np.linspace(0, 5, 150)) @ q.T)
    direct = lanczos(matrix, 4, seed=0, tol=1e-10)
    monkeypatch.setattr(eigenpairs, "fits_on_device", lambda device, num_bytes: False)
    staged = lanczos(matrix, 4, seed=0, tol=1e-10)
    torch.testing.assert_close(staged.eigenvectors, direct.eigenvectors, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(staged.eigenvalues, direct.eigenvalues)
