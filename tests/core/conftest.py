"""Tiny float64 models and data for the core operator tests.

Every model is small enough that dense ``(n, n)`` matrices are cheap (n < 120), so operators can be
checked against ``torch.func`` references to rounding error. Randomness comes from explicit seeds
(model initialisation under ``torch.random.fork_rng``, data from a ``torch.Generator``), so the
global RNG of the test session is left alone.

Shared helpers are fixtures (the suite runs with ``--import-mode=importlib``, where test files
cannot import this module by name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import supervised_loss

DTYPE = torch.float64
NUM_CLASSES = 3


def seeded_module(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` with parameters drawn from ``seed``, in float64, without touching the
    session's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory().to(DTYPE)


class SDPABlock(nn.Module):
    """Two-head self-attention through ``F.scaled_dot_product_attention`` on 4-d
    ``(batch, heads, length, head_dim)`` tensors (the layout whose fused CPU kernel has no
    forward-mode AD), then a mean over positions and a linear head."""

    def __init__(self, dim: int = 4, heads: int = 2, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.head(attended.transpose(1, 2).reshape(batch, length, dim).mean(1))


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` (which calls SDPA inside) and a linear head."""

    def __init__(self, dim: int = 4, heads: int = 2, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(torch.tanh(attended).mean(1))


class LSTMNet(nn.Module):
    """One-layer LSTM over a short sequence; the last hidden state feeds a linear head."""

    def __init__(self, features: int = 3, hidden: int = 3, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES))


def make_cnn_bn() -> nn.Module:
    """Conv -> BatchNorm -> tanh -> linear, put in eval mode with non-trivial running stats."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, NUM_CLASSES)
    )
    batchnorm = model[1]
    with torch.no_grad():
        batchnorm.running_mean.copy_(torch.tensor([0.3, -0.2]))
        batchnorm.running_var.copy_(torch.tensor([1.5, 0.7]))
    return model.eval()


# name -> (model factory, shape of one input sample)
MODEL_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (make_mlp, (4,)),
    "cnn_batchnorm_eval": (make_cnn_bn, (1, 5, 5)),
    "sdpa_attention": (SDPABlock, (3, 4)),
    "multihead_attention": (MHABlock, (3, 4)),
    "lstm": (LSTMNet, (2, 3)),
}


@dataclass
class Case:
    """A model, a list of (inputs, labels) batches of uneven sizes, and a cross-entropy loss."""

    name: str
    model: nn.Module
    data: list[Any]
    loss: Any


def classification_data(
    sample_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (5, 3), seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian inputs and uniform class labels, one batch per entry of ``batch_sizes``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((size, *sample_shape), generator=generator, dtype=DTYPE),
            torch.randint(0, NUM_CLASSES, (size,), generator=generator),
        )
        for size in batch_sizes
    ]


def build_case(name: str, seed: int = 0) -> Case:
    factory, sample_shape = MODEL_CASES[name]
    model = seeded_module(factory, seed)
    if name == "cnn_batchnorm_eval":
        model.eval()
    return Case(name, model, classification_data(sample_shape), supervised_loss(F.cross_entropy))


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread per test: the models are tiny, and on a loaded 2-core machine OpenMP
    worker threads spinning for a core made these tests 6x slower (34 s -> 6 s for one file)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=list(MODEL_CASES))
def tiny_case(request: pytest.FixtureRequest) -> Case:
    """Each tiny model in turn (test ids: the model names)."""
    return build_case(request.param)


@pytest.fixture
def make_case() -> Callable[..., Case]:
    """``make_case(name, seed=0)``: one of the tiny models, its data and a cross-entropy loss."""
    return build_case


@pytest.fixture
def make_data() -> Callable[..., list[Any]]:
    """``make_data(sample_shape, batch_sizes=(5, 3), seed=1)``: classification batches."""
    return classification_data


def to_dense(operator: Any) -> torch.Tensor:
    """The operator's matrix, from one ``matmat`` with the identity (torch path)."""
    size = operator.shape[0]
    return operator @ torch.eye(size, dtype=operator.torch_dtype, device=operator.device)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm relative error ``||actual - expected|| / ||expected||``."""
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture
def dense() -> Callable[[Any], torch.Tensor]:
    return to_dense


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return relative_error


def pytest_configure(config: pytest.Config) -> None:
    # torch's forward-mode AD loads TorchScript decompositions on first use and warns about it
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )
