"""``cuda_graph=True``: one-column products on kept graphs replayed from a CUDA graph.

On the CPU the capture is replaced by a stand-in that records the product function and re-runs
it on replay, which checks our side of the contract (static input copied in, output cloned out,
recapture when the kept graphs are rebuilt, several columns and failures multiplied eagerly,
options refused where capture cannot work). The CUDA test captures for real (GPU machine)."""

from __future__ import annotations

import warnings

import pytest
import torch

import torch_linop._cuda_graph as cuda_graph_module
from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    ProductOptions,
)
from torch_linop._cuda_graph import CapturedProduct, _Capture
from torch_linop.reference import dense_ggn

TOL = 1e-10


class ReplayingStandIn:
    """Records ``product`` at capture; ``replay()`` runs it again on the static input."""

    def __init__(self, product, vector, output) -> None:
        self.product, self.vector, self.output = product, vector, output

    def replay(self) -> None:
        self.output.copy_(self.product(self.vector))


@pytest.fixture
def stand_in_capture(monkeypatch):
    captures = []

    def capture(product, column):
        vector = column.clone()
        output = product(vector)
        captures.append(output)
        return _Capture(ReplayingStandIn(product, vector, output), vector, output)

    monkeypatch.setattr(cuda_graph_module, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    return captures


def with_stand_in(operator):
    """Switch capture on for an operator built on the CPU (the constructor refuses the CPU)."""
    operator.cuda_graph = True
    operator._captured = CapturedProduct()
    return operator


def random_vector(size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_replayed_products_equal_eager_ones_and_recapture_after_changes(
    make_case, rel_err, stand_in_capture
):
    case = make_case("cnn_batchnorm_eval")
    model, data, loss = case.model, case.data, case.loss
    operator = with_stand_in(GGNOperator(model, data, loss, cache_graph=True))
    reference = dense_ggn(model, data, loss)
    for seed in (1, 2, 3):  # one capture, then replays with new vectors copied in
        vector = random_vector(operator.shape[0], seed)
        result = operator @ vector
        assert rel_err(result, reference @ vector) <= TOL
    assert len(stand_in_capture) == 1
    first = operator @ vector
    second = operator @ vector
    assert first.data_ptr() != second.data_ptr()  # cloned out of the static output
    block = torch.stack([random_vector(operator.shape[0], s) for s in (4, 5)], dim=1)
    assert rel_err(operator @ block, reference @ block) <= TOL  # several columns: eager
    assert len(stand_in_capture) == 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    loss(model, data[0]).backward()
    optimizer.step()  # the kept graphs are rebuilt: the capture must be too
    assert rel_err(operator @ vector, dense_ggn(model, data, loss) @ vector) <= TOL
    assert len(stand_in_capture) == 2
    operator.clear_cache()
    assert operator._captured._capture is None


@pytest.mark.parametrize("name", ["hessian", "empirical_fisher"])
def test_hessian_and_empirical_fisher_replay(make_case, rel_err, stand_in_capture, name):
    case = make_case("mlp")
    build = HessianOperator if name == "hessian" else EmpiricalFisherOperator
    operator = with_stand_in(build(case.model, case.data, case.loss, cache_graph=True))
    eager = build(case.model, case.data, case.loss)
    for seed in (6, 7):
        vector = random_vector(operator.shape[0], seed)
        assert rel_err(operator @ vector, eager @ vector) <= TOL
    assert len(stand_in_capture) == 1


def test_a_failed_capture_warns_once_and_multiplies_eagerly(make_case, rel_err, monkeypatch):
    def failing_capture(product, column):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph_module, "_capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    case = make_case("mlp")
    operator = with_stand_in(GGNOperator(case.model, case.data, case.loss, cache_graph=True))
    expected = GGNOperator(case.model, case.data, case.loss)
    vector = random_vector(operator.shape[0], 8)
    with pytest.warns(RuntimeWarning, match="capturing the product failed"):
        assert rel_err(operator @ vector, expected @ vector) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(operator @ vector, expected @ vector) <= TOL
    assert operator._captured.failed


def test_options_that_cannot_be_captured_are_refused(make_case):
    case = make_case("mlp")
    model, data, loss = case.model, case.data, case.loss
    capture = ProductOptions(cuda_graph=True)
    with pytest.raises(ValueError, match="pass cache_graph=True with it"):
        GGNOperator(model, data, loss, options=capture)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GGNOperator(model, data, loss, cache_graph=True, options=capture)
    with pytest.raises(ValueError, match="cannot capture jvp_method='forward_difference'"):
        GGNOperator(
            model, data, loss, jvp_method="forward_difference", cache_graph=True, options=capture
        )
    with pytest.raises(ValueError, match="MCFisherOperator has no CUDA-graph replay"):
        MCFisherOperator(model, data, loss, cache_graph=True, options=capture)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        HessianOperator(
            model,
            data,
            loss,
            cache_graph=True,
            options=ProductOptions(cuda_graph=1),  # type: ignore[arg-type]
        )


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_gpt2(dtype: torch.dtype):
    """A 2-layer HF GPT-2 (vocabulary 50) on the GPU with one batch of 3 x 8 tokens."""
    transformers = pytest.importorskip("transformers")
    from torch_linop import hf_lm_loss

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, attn_pdrop=0.0,
        embd_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to("cuda", dtype).eval()
    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": tokens.cuda()}], hf_lm_loss()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_capture_and_replay_on_a_transformer(rel_err, dtype):
    """A real capture: a small HF GPT-2 on the GPU. Replays equal the eager cached products
    (the same kernels), for new vectors, for several columns and after a parameter change
    (recapture). Before the kept graphs moved to the side stream, this capture failed: the
    backward of a graph recorded on the legacy stream cannot be captured on another."""
    model, data, loss = small_gpt2(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for build in (GGNOperator, HessianOperator):
        graphed = build(
            model, data, loss, cache_graph=True, options=ProductOptions(cuda_graph=True)
        )
        eager = build(model, data, loss, cache_graph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
            for seed in (1, 2, 3):
                vector = random_vector(graphed.shape[0], seed).to("cuda", dtype)
                assert rel_err(graphed @ vector, eager @ vector) <= tol
        assert graphed._captured._capture is not None and not graphed._captured.failed
        block = torch.stack([random_vector(graphed.shape[0], s) for s in (5, 6)], 1)
        block = block.to("cuda", dtype)
        assert rel_err(graphed @ block, eager @ block) <= tol  # several columns: side stream
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)  # rebuild and recapture
        vector = random_vector(graphed.shape[0], 4).to("cuda", dtype)
        assert rel_err(graphed @ vector, eager @ vector) <= tol
        assert not graphed._captured.failed


class SyncingModel(torch.nn.Module):
    """A linear model whose forward reads a device value on the host (not capturable)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.linear(inputs)
        return output * 2.0 if float(output.detach().sum()) > -1e30 else output


@needs_cuda
def test_cuda_failed_capture_leaves_the_device_usable(rel_err):
    """A product that syncs with the host cannot be captured: one warning, eager products with
    the same numbers, and the device's random generator and later captures still work (torch
    leaves its generator in capture mode after a failed capture)."""
    from torch_linop import supervised_loss

    torch.manual_seed(0)
    model = SyncingModel().cuda().double()
    inputs = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2, 1, 1, 0])
    data = [(inputs.cuda(), targets.cuda())]
    loss = supervised_loss(torch.nn.CrossEntropyLoss())
    graphed = GGNOperator(
        model, data, loss, cache_graph=True, options=ProductOptions(cuda_graph=True)
    )
    reference = dense_ggn(model, data, loss)
    vector = random_vector(graphed.shape[0], 3).cuda()
    with pytest.warns(RuntimeWarning, match="capturing the product failed"):
        assert rel_err(graphed @ vector, reference @ vector) <= TOL
    assert graphed._captured.failed
    assert torch.randn(4, device="cuda").isfinite().all()  # the generator left capture mode
    assert rel_err(graphed @ vector, reference @ vector) <= TOL
    model_2, data_2, loss_2 = small_gpt2(torch.float64)
    other = GGNOperator(
        model_2, data_2, loss_2, cache_graph=True, options=ProductOptions(cuda_graph=True)
    )
    vector_2 = random_vector(other.shape[0], 4).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        other @ vector_2
    assert other._captured._capture is not None
