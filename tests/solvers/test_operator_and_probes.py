"""The operator adapter (what every solver accepts and how it fails) and the probe generator
(same seed, same probes, however they are batched)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from torch_linop.solvers import lanczos, trace
from torch_linop.solvers._operator import as_operator
from torch_linop.solvers._random import draw_probes, make_generator


def test_numpy_inputs_run_in_float64_and_return_numpy():
    matrix = np.diag(np.arange(1.0, 6.0)).astype(np.float32)
    for op in (
        matrix,
        scipy.sparse.csr_matrix(matrix),
        scipy.sparse.linalg.aslinearoperator(matrix),
    ):
        adapted = as_operator(op)
        assert adapted.returns_numpy and adapted.dtype == torch.float64 and adapted.size == 5
        block = torch.ones(5, 2, dtype=torch.float64)
        np.testing.assert_array_equal(adapted.matmat(block)[:, 0].numpy(), np.arange(1.0, 6.0))


def test_torch_inputs_keep_device_and_compute_in_float32_at_least(torch_operator):
    half = torch.eye(4, dtype=torch.bfloat16)
    adapted = as_operator(torch_operator(half))
    assert not adapted.returns_numpy and adapted.dtype == torch.float32
    assert adapted.eps == torch.finfo(torch.bfloat16).eps
    assert adapted.matmat(torch.ones(4, 3)).dtype == torch.float32
    assert as_operator(torch.eye(3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("op", "error", "message"),
    [
        (np.ones((2, 3)), ValueError, "must be square"),
        (torch.ones(2, 3), ValueError, "must be square"),
        (torch.ones(2, 2, 2), ValueError, "must be square"),
        (torch.eye(2, dtype=torch.int64), TypeError, "convert it to a floating dtype"),
        (torch.eye(2, dtype=torch.complex64), TypeError, "complex"),
        ("matrix", TypeError, "cannot use an object of type str"),
    ],
)
def test_unusable_operators(op, error, message):
    with pytest.raises(error, match=message):
        as_operator(op)


def test_torch_protocol_returning_the_wrong_thing_is_a_type_error():
    class ReturnsNumpy:
        device = torch.device("cpu")
        torch_dtype = torch.float64
        shape = (3, 3)

        def matmat(self, block):
            return block.numpy()

    with pytest.raises(TypeError, match="needs a torch tensor of the same shape"):
        trace(ReturnsNumpy(), 4, seed=0)


def test_probes_do_not_depend_on_batching_and_are_signs_or_normals():
    all_at_once = draw_probes(
        5, 300, make_generator(7), distribution="rademacher", dtype=torch.float64, device="cpu"
    )
    generator = make_generator(7)
    batched = torch.cat(
        [
            draw_probes(
                count, 300, generator, distribution="rademacher", dtype=torch.float64, device="cpu"
            )
            for count in (2, 3)
        ],
        dim=1,
    )
    assert torch.equal(all_at_once, batched)
    assert set(all_at_once.unique().tolist()) == {-1.0, 1.0}
    normals = draw_probes(
        50, 400, make_generator(1), distribution="gaussian", dtype=torch.float32, device="cpu"
    )
    assert abs(float(normals.mean())) < 0.02 and abs(float(normals.std()) - 1) < 0.02


def test_seed_none_draws_fresh_entropy():
    first = draw_probes(
        1, 64, make_generator(None), distribution="gaussian", dtype=torch.float64, device="cpu"
    )
    second = draw_probes(
        1, 64, make_generator(None), distribution="gaussian", dtype=torch.float64, device="cpu"
    )
    assert not torch.equal(first, second)


def test_progress_bar_counts_matvecs_when_forced(capsys):
    trace(np.eye(30), 9, seed=0, progress=True)
    assert "matvec" in capsys.readouterr().err
    lanczos(np.diag(np.arange(1.0, 31.0)), 2, seed=0, progress=False)
    trace(np.eye(30), 9, seed=0)  # auto: stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
