"""``HessianOperator(cache_graph=True)``: the kept per-batch gradient graphs give the same products
as the uncached operator and as independent dense Hessians (float64, 1e-10), are rebuilt when the
model, its mode or the data change, never change the model, and leave no cache behind a failed
product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from torch import nn

import torch_linop.hessian as hessian_module
from torch_linop import HessianOperator, lanczos, supervised_loss
from torch_linop.reference import dense_ggn, dense_hessian
from torch_linop.solvers import checkpoint as checkpoint_module
from torch_linop.solvers._operator import as_operator

DTYPE = torch.float64
TOL = 1e-10
CE = supervised_loss(F.cross_entropy)


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for name, param in model.named_parameters():
        original, values = before["params"][name]
        assert param is original and torch.equal(param.detach(), values), name
    for name, buffer in model.named_buffers():
        original, values = before["buffers"][name]
        assert buffer is original and torch.equal(buffer, values), name
    assert [m.training for m in model.modules()] == before["training"]


def dense_hessian_by_columns(model: nn.Module, data: list, loss) -> torch.Tensor:
    """The dataset Hessian column by column, each a single forward-over-reverse ``jvp`` of
    ``torch.func.grad`` through ``functional_call`` with cloned buffers (right for train-mode
    BatchNorm, where the vmapped ``torch.func.hessian`` is not; shares no code with ours)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    counts = [int(y.numel()) for _, y in data]

    def dataset_loss(vector: torch.Tensor) -> torch.Tensor:
        values = {n: c.view(s) for n, c, s in zip(names, vector.split(sizes), shapes)}
        total = vector.new_zeros(())
        for (x, y), count in zip(data, counts):
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            output = torch.func.functional_call(model, {**values, **buffers}, (x,))
            total = total + count / sum(counts) * loss.loss(output, (x, y))
        return total

    gradient = torch.func.grad(dataset_loss)
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    return torch.stack([torch.func.jvp(gradient, (flat,), (e,))[1] for e in eye], dim=1)


def mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def cnn_batchnorm() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
        ).to(DTYPE)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.7]))
    return model


def batches(sample_shape: tuple[int, ...], sizes: tuple[int, ...] = (5, 3)) -> list:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn((size, *sample_shape), generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for size in sizes
    ]


def identity(size: int) -> torch.Tensor:
    return torch.eye(size, dtype=DTYPE)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


CASES = {
    "mlp_two_batches": lambda: (mlp(), batches((4,))),
    "mlp_one_batch": lambda: (mlp(), batches((4,), sizes=(6,))),
    "mlp_four_batches": lambda: (mlp(), batches((4,), sizes=(2, 5, 1, 3))),
    "cnn_batchnorm_eval": lambda: (cnn_batchnorm().eval(), batches((1, 5, 5))),
    "cnn_batchnorm_train": lambda: (cnn_batchnorm().train(), batches((1, 5, 5))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cached_products_equal_uncached_and_dense(name):
    model, data = CASES[name]()
    before = snapshot(model)
    cached = HessianOperator(model, data, CE, cache_graph=True)
    uncached = HessianOperator(model, data, CE)
    if name.endswith("_train"):  # torch.func.hessian is wrong on train-mode BatchNorm
        reference = dense_hessian_by_columns(model, data, CE)
    else:
        reference = dense_hessian(model, data, CE)
    matrix = cached @ identity(cached.shape[0])  # builds the graphs, then a batched product
    assert relative_error(matrix, reference) <= TOL
    assert relative_error(matrix, uncached @ identity(cached.shape[0])) <= TOL
    generator = torch.Generator().manual_seed(2)
    vector = torch.randn(cached.shape[0], generator=generator, dtype=DTYPE)
    for _ in range(2):  # the kept graphs serve every later product
        assert relative_error(cached @ vector, reference @ vector) <= TOL
    assert (
        relative_error(torch.from_numpy(cached.matvec(vector.numpy())), reference @ vector) <= TOL
    )
    assert cached._graphs is not None and len(cached._graphs) == len(data)
    assert_unchanged(model, before)


def test_graphs_are_built_once_and_kept():
    model, data = CASES["mlp_two_batches"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    vector = torch.ones(operator.shape[0], dtype=DTYPE)
    operator @ vector
    graphs = operator._graphs
    operator @ vector
    operator @ torch.ones(operator.shape[0], 3, dtype=DTYPE)
    assert operator._graphs is graphs
    assert len(calls) == len(data)  # one forward pass per batch, for all three products


def test_batched_and_looped_products_agree():
    model, data = CASES["cnn_batchnorm_eval"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    generator = torch.Generator().manual_seed(3)
    block = torch.randn(operator.shape[0], 4, generator=generator, dtype=DTYPE)
    batched = operator @ block
    columns = torch.stack([operator @ block[:, j] for j in range(4)], dim=1)
    operator.capabilities.batched_backward.supported = False
    looped = operator @ block
    assert relative_error(looped, batched) <= TOL
    assert relative_error(columns, batched) <= TOL


def test_vmap_failure_falls_back_to_the_loop_on_the_kept_graph(monkeypatch):
    model, data = CASES["mlp_two_batches"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    block = torch.randn(
        operator.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=DTYPE
    )
    expected = HessianOperator(model, data, CE) @ block
    operator @ block[:, 0]
    graphs = operator._graphs
    grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: no batching rule for this operator")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    assert relative_error(operator @ block, expected) <= TOL
    assert operator.capabilities.batched_backward.supported is False
    assert operator._graphs is graphs  # the graphs survived the failed batched backward


def test_rebuilt_after_in_place_updates_and_mode_switches():
    model, data = CASES["cnn_batchnorm_eval"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    vector = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(5), dtype=DTYPE)

    def assert_fresh() -> None:
        fresh = HessianOperator(model, data, CE) @ vector
        graphs = operator._graphs
        assert relative_error(operator @ vector, fresh) <= TOL
        assert operator._graphs is not graphs  # rebuilt, not reused

    operator @ vector
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = CE(model, data[0])
    loss.backward()
    optimizer.step()  # in place, through the version counters
    optimizer.zero_grad()
    assert_fresh()
    with torch.no_grad():
        model[1].running_var.mul_(2.0)  # a buffer
    assert_fresh()
    model[1].train()  # BatchNorm switches to batch statistics
    assert_fresh()
    model[1].eval()
    assert_fresh()
    with torch.no_grad():
        data[1][0].mul_(-1.5)  # a batch tensor of the list
    assert_fresh()
    model[1].running_mean = torch.zeros(2, dtype=DTYPE)  # a buffer replaced by another
    assert_fresh()
    model[0].weight.data = model[0].weight.data * 0.5  # new storage behind the same Parameter
    assert_fresh()


def test_clear_cache_after_writes_the_version_counters_cannot_see():
    model, data = CASES["mlp_two_batches"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    vector = torch.ones(operator.shape[0], dtype=DTYPE)
    stale = operator @ vector
    model[0].weight.data.mul_(3.0)  # .data has its own version counter: invisible to the cache
    operator.clear_cache()
    assert operator._graphs is None
    updated = operator @ vector
    assert relative_error(updated, HessianOperator(model, data, CE) @ vector) <= TOL
    assert relative_error(updated, stale) > 1e-3


class Flaky(nn.Module):
    """An MLP that raises inside its forward pass while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail and x.shape[0] == 3:  # the second batch: the first one's graph is built
            raise RuntimeError("boom inside the model")
        return self.body(x)


def test_failed_products_leave_no_cache_and_the_model_unchanged(monkeypatch):
    model = Flaky()
    data = batches((4,))
    before = snapshot(model)
    operator = HessianOperator(model, data, CE, cache_graph=True)
    vector = torch.ones(operator.shape[0], dtype=DTYPE)
    expected = HessianOperator(model, data, CE) @ vector
    model.fail = True
    with pytest.raises(RuntimeError, match="boom inside the model"):
        operator @ vector  # fails while building, after one batch's graph
    assert operator._graphs is None
    assert_unchanged(model, before)
    model.fail = False
    assert relative_error(operator @ vector, expected) <= TOL

    def failing_backward(*args, **kwargs):
        raise RuntimeError("boom in the backward pass")

    monkeypatch.setattr(hessian_module, "double_backward", failing_backward)
    with pytest.raises(RuntimeError, match="boom in the backward pass"):
        operator @ vector  # fails in a product on kept graphs: they are dropped
    assert operator._graphs is None
    monkeypatch.undo()
    assert relative_error(operator @ vector, expected) <= TOL
    assert_unchanged(model, before)


def test_batchnorm_in_train_mode_inside_an_eval_model_keeps_its_statistics():
    """Buffers are cloned when any submodule trains, not only when the root does."""
    model, data = CASES["cnn_batchnorm_eval"]()
    model[1].train()
    before = snapshot(model)
    for cache_graph in (False, True):
        operator = HessianOperator(model, data, CE, cache_graph=cache_graph)
        operator @ torch.ones(operator.shape[0], dtype=DTYPE)
        assert_unchanged(model, before)


def test_options_are_checked():
    model, data = CASES["mlp_two_batches"]()
    for method in ("forward", "finite_difference"):
        with pytest.raises(ValueError, match="cache_graph=True needs method='autograd'"):
            HessianOperator(model, data, CE, method=method, cache_graph=True)
    with pytest.raises(TypeError, match="cache_graph must be True or False"):
        HessianOperator(model, data, CE, cache_graph=1)


def test_eigsh_on_the_cached_operator():
    model, data = CASES["cnn_batchnorm_eval"]()
    operator = HessianOperator(model, data, CE, cache_graph=True)
    expected = np.linalg.eigvalsh(dense_hessian(model, data, CE).numpy())[-3:]
    values = eigsh(operator, k=3, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), expected, rtol=1e-9, atol=1e-12)


def test_checkpoints_resume_across_cached_and_uncached(tmp_path):
    """Cached or not, the operator has the same fingerprint, so a run checkpointed with one
    resumes with the other to the uninterrupted result."""
    model, data = CASES["mlp_two_batches"]()
    plain = HessianOperator(model, data, CE)
    cached = HessianOperator(model, data, CE, cache_graph=True)
    assert (
        checkpoint_module.fingerprint_mismatch(
            checkpoint_module.fingerprint(plain, as_operator(plain)),
            checkpoint_module.fingerprint(cached, as_operator(cached)),
        )
        is None
    )
    reference = lanczos(plain, 2, seed=0)
    failing = HessianOperator(model, data, CE)
    path = tmp_path / "lanczos.pt"
    products = [0]
    original = failing.batch_product

    def stop_after_six_products(batch, tangents):
        products[0] += 1
        if products[0] > 12:  # two batches per product
            raise KeyboardInterrupt
        return original(batch, tangents)

    failing.batch_product = stop_after_six_products
    with pytest.raises(KeyboardInterrupt):
        lanczos(failing, 2, seed=0, checkpoint=path, checkpoint_every=2)
    assert path.exists()
    resumed = lanczos(cached, 2, seed=0, checkpoint=path)
    np.testing.assert_allclose(resumed.eigenvalues, reference.eigenvalues, rtol=1e-12)
    assert resumed.num_matvecs == reference.num_matvecs


RANK_SCRIPT = """
import sys
from datetime import timedelta
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from torch_linop import GGNOperator, HessianOperator, supervised_loss
rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                        timeout=timedelta(seconds=60))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
generator = torch.Generator().manual_seed(1)
data = [(torch.randn(size, 4, generator=generator, dtype=torch.float64),
         torch.randint(0, 3, (size,), generator=generator)) for size in (3, 5, 2, 4)]
op = HessianOperator(model, data[rank::world], supervised_loss(F.cross_entropy), cache_graph=True)
eye = torch.eye(op.shape[0], dtype=torch.float64)
ggn = GGNOperator(model, data[rank::world], supervised_loss(F.cross_entropy), cache_graph=True)
torch.save({"first": op @ eye, "second": op @ eye, "num_data": op.num_data,
            "ggn_first": ggn @ eye, "ggn_second": ggn @ eye}, out + f"/{rank}.pt")
dist.destroy_process_group()
"""


def test_data_parallel_products_on_two_gloo_ranks(tmp_path):
    """Each rank keeps the graphs of its own shard; the all-reduce after the products gives the
    Hessian (and the cached GGN) of the union of the data on every rank."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = [str(tmp_path / "store"), str(tmp_path)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", *args],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for process in ranks:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(size, 4, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for size in (3, 5, 2, 4)
    ]
    reference = dense_hessian(model, data, CE)
    ggn_reference = dense_ggn(model, data, CE)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["num_data"] == 14
        assert relative_error(result["first"], reference) <= TOL
        assert relative_error(result["second"], reference) <= TOL
        assert relative_error(result["ggn_first"], ggn_reference) <= TOL
        assert relative_error(result["ggn_second"], ggn_reference) <= TOL
