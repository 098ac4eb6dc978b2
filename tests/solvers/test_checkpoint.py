"""The checkpoint machinery itself: atomic writes, save intervals in products and seconds, what
the fingerprint tells apart, and resuming with a generator seed or another save interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_linop.solvers import checkpoint as checkpoint_module
from torch_linop.solvers import lanczos, power_iteration, trace
from torch_linop.solvers._operator import as_operator


def matrix(size: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    orthogonal, _ = np.linalg.qr(rng.standard_normal((size, size)))
    spectrum = np.concatenate([np.geomspace(1, 50, 6), rng.uniform(-1, 1, size - 6)])
    dense = (orthogonal * spectrum) @ orthogonal.T
    return (dense + dense.T) / 2


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoint_module.atomic_save({"step": 1}, path)
    real_save = torch.save

    def half_then_fail(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left


def test_saves_every_n_products_or_every_t_seconds(tmp_path, monkeypatch):
    operator = as_operator(matrix())
    by_products = checkpoint_module.Checkpoint(
        tmp_path / "a.pt", solver="x", options={}, op=None, operator=operator, every_matvecs=5
    )
    saved = [n for n in range(1, 23) if by_products.maybe_save(n, lambda: {"n": 1})]
    assert saved == [5, 10, 15, 20]

    clock = [100.0]
    monkeypatch.setattr(checkpoint_module.time, "monotonic", lambda: clock[0])
    by_time = checkpoint_module.Checkpoint(
        tmp_path / "b.pt", solver="x", options={}, op=None, operator=operator, every_seconds=60
    )
    saved = []
    for n in range(1, 11):
        clock[0] += 25.0  # 25 s per product
        if by_time.maybe_save(n, lambda: {"n": 1}):
            saved.append(n)
    assert saved == [3, 6, 9]
    default = checkpoint_module.Checkpoint(
        tmp_path / "c.pt", solver="x", options={}, op=None, operator=operator
    )
    assert default.every_seconds == checkpoint_module.DEFAULT_SECONDS
    assert default.every_matvecs is None


def test_fingerprints_tell_operators_apart():
    base = matrix()
    same = checkpoint_module.fingerprint(base.copy(), as_operator(base.copy()))
    reference = checkpoint_module.fingerprint(base, as_operator(base))
    assert checkpoint_module.fingerprint_mismatch(reference, same) is None
    perturbed = base.copy()
    perturbed[3, 4] = perturbed[4, 3] = perturbed[3, 4] + 1e-3
    other = checkpoint_module.fingerprint(perturbed, as_operator(perturbed))
    assert "product with a fixed probe differs" in checkpoint_module.fingerprint_mismatch(
        reference, other
    )
    as_float64, as_float32 = torch.from_numpy(base), torch.from_numpy(base).float()
    assert "dtype" in checkpoint_module.fingerprint_mismatch(
        checkpoint_module.fingerprint(as_float64, as_operator(as_float64)),
        checkpoint_module.fingerprint(as_float32, as_operator(as_float32)),
    )
    assert "type" in checkpoint_module.fingerprint_mismatch(
        reference, checkpoint_module.fingerprint(as_float64, as_operator(as_float64))
    )


def test_resume_with_a_generator_seed_and_another_interval(tmp_path):
    from scipy.sparse.linalg import LinearOperator

    dense = matrix()

    def plain() -> LinearOperator:
        return LinearOperator(dense.shape, matvec=lambda x: dense @ x, matmat=lambda x: dense @ x)

    reference = power_iteration(plain(), k=2, seed=torch.Generator().manual_seed(5), max_iter=40)

    class Stop(Exception):
        pass

    calls = [0]

    def interrupted(block):
        calls[0] += 1
        if calls[0] == 30:
            raise Stop
        return dense @ block

    failing = LinearOperator(dense.shape, matvec=interrupted, matmat=interrupted, dtype=float)
    path = tmp_path / "power.pt"
    with pytest.raises(Stop):
        power_iteration(
            failing,
            k=2,
            seed=torch.Generator().manual_seed(5),
            max_iter=40,
            checkpoint=path,
            checkpoint_every=4,
        )
    # the generator passed on resume gets the saved state; the interval may change
    resumed = power_iteration(
        plain(),
        k=2,
        seed=torch.Generator().manual_seed(999),
        max_iter=40,
        checkpoint=path,
        checkpoint_seconds=3600,
    )
    assert (resumed.eigenvalues == reference.eigenvalues).all()
    assert (resumed.eigenvectors == reference.eigenvectors).all()
    assert resumed.num_matvecs == reference.num_matvecs


def test_checkpoint_is_not_kept_from_a_failed_start(tmp_path):
    """Arguments are checked before anything is written, and a finished run can be resumed (it
    repeats only the products after its last save)."""
    path = tmp_path / "run.pt"
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        lanczos(matrix(), 2, tol=-1.0, checkpoint=path)
    assert not path.exists()
    first = trace(matrix(), 24, seed=0, block_size=4, checkpoint=path, checkpoint_every=4)
    again = trace(matrix(), 24, seed=0, block_size=4, checkpoint=path, checkpoint_every=4)
    assert first.estimate == again.estimate and first.stderr == again.stderr


def test_dense_matrices_give_the_same_bits_wherever_they_lie_in_memory():
    """MKL's products depend on the alignment of their operands: a dense matrix that starts off
    a 64-byte boundary (a numpy array, a view) is copied, so the same matrix gives the same bits
    in any process, which bit-identical resumes need."""
    dense = matrix(37)
    aligned = lanczos(torch.from_numpy(dense.copy()), 3, seed=0)
    for offset in range(1, 8):  # float64 entries: 8 to 56 bytes off the boundary
        buffer = torch.empty(dense.size + offset, dtype=torch.float64)
        shifted = buffer[offset:].view(dense.shape)
        shifted.copy_(torch.from_numpy(dense))
        for operand in (shifted, shifted.numpy()):
            result = lanczos(operand, 3, seed=0)
            assert (result.eigenvalues == aligned.eigenvalues).all()
            assert (np.asarray(result.eigenvectors) == aligned.eigenvectors.numpy()).all()


def test_a_checkpoint_that_does_not_fit_on_the_disk_warns_and_the_run_goes_on(
    tmp_path, monkeypatch
):
    import shutil

    from torch_linop.solvers import checkpoint as checkpoint_module
    from torch_linop.solvers import lanczos

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        checkpoint_module.shutil, "disk_usage", lambda path: usage._replace(free=1000)
    )
    matrix = np.diag(np.arange(1.0, 61.0))
    path = tmp_path / "run.pt"
    with pytest.warns(RuntimeWarning, match="checkpoint not saved"):
        result = lanczos(matrix, 3, seed=0, checkpoint=path, checkpoint_every=1)
    assert not path.exists()
    np.testing.assert_allclose(result.eigenvalues, [60.0, 59.0, 58.0], rtol=1e-10)
