"""The shared benchmark problems: model + data + loss, built in code from a seed.

Every suite and every library sees the same ``Problem``: one model in eval mode, a list of
``(inputs, targets)`` batches made by a seeded ``torch.Generator`` on the CPU (then moved to the
device, so a seed gives the same numbers on CPU and GPU) and ``nn.CrossEntropyLoss()``. Nothing is
downloaded. Models:

- ``mlp``: a GELU MLP 128-256-256-10 (~100k parameters) on a learnable teacher task;
- ``cnn``: a ResNet-ish CNN (four residual stages 32-64-128-256, eval-mode BatchNorm with
  statistics calibrated on the data, ~1.2M parameters) on 3x32x32 images;
- ``gpt``: a GPT-2-style decoder built from a ``transformers.GPT2Config`` (~10M parameters on the
  CPU, GPT-2 small's 124M on the GPU) with eager attention, so every library can differentiate
  it twice; logits come out as ``(batch * seq, vocab)`` rows, one row per predicted token;
- ``mlp-small``: a 16-48-32-10 MLP (~2.7k parameters) trained for 60 full-batch Adam steps, small
  enough for exact dense spectra (trace and density suites).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAMES = ("mlp", "cnn", "gpt", "mlp-small")
SIZE_TIERS = ("smoke", "cpu", "cuda")


@dataclass
class Problem:
    """One benchmark problem: everything a curvature library needs, plus labels for tables.

    ``batches`` is a list of ``(inputs, targets)`` on the model's device; ``criterion`` acts on
    ``model(inputs)`` and ``targets``. ``rows_per_input > 1`` means one input (a sequence) yields
    several loss terms (tokens): per-sample quantities (the empirical Fisher) are per row.
    """

    name: str
    description: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    criterion: nn.Module
    rows_per_input: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters in ``named_parameters()`` order (every library's flat order)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def num_inputs(self) -> int:
        """Number of inputs (images, sequences) over all batches."""
        return sum(int(inputs.shape[0]) for inputs, _ in self.batches)

    def with_model_copy(self) -> Problem:
        """The same problem on a deep copy of the model (for libraries that modify the model)."""
        return replace(self, model=copy.deepcopy(self.model))

    def loss(self, model: nn.Module | None = None) -> torch.Tensor:
        """The dataset loss (sample-weighted mean over batches) of ``model`` (default: own)."""
        model = self.model if model is None else model
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        count = 0
        for inputs, targets in self.batches:
            rows = targets.numel()
            total = total + self.criterion(model(inputs), targets) * rows
            count += rows
        return total / count


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Fully connected GELU network ``sizes[0] -> ... -> sizes[-1]``."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    """A small ResNet: stem conv, one basic block per width (stride 2 after the first), global
    average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, 1 if i == 0 else 2))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.head(features)


class GPTBlock(nn.Module):
    """GPT-2 transformer block (pre-LayerNorm, causal self-attention, tanh-GELU MLP)."""

    def __init__(self, n_embd: int, n_head: int, eps: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Eager causal attention (the math every autodiff mode supports, like HF "eager")."""
        batch, seq, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        shape = (batch, seq, self.n_head, width // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(shape[-1])
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ v
        return self.attn_proj(out.transpose(1, 2).reshape(batch, seq, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-style decoder from a ``GPT2Config`` (n_layer, n_embd, n_head, vocab_size,
    n_positions, layer_norm_epsilon), output embedding tied to the input embedding.

    ``forward(input_ids (B, T)) -> logits (B * T, vocab)``: one row per predicted token, the
    layout every library's cross-entropy accepts.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        eps = float(getattr(config, "layer_norm_epsilon", 1e-5))
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(
            GPTBlock(config.n_embd, config.n_head, eps) for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, eps=eps)
        self._init_weights(float(getattr(config, "initializer_range", 0.02)), config.n_layer)

    def _init_weights(self, std: float, n_layer: int) -> None:
        """GPT-2's initialisation: N(0, std), residual projections scaled by 1/sqrt(2 n_layer)."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "ln_" in name:
                nn.init.ones_(param)
            else:
                scale = 1.0 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 1.0
                nn.init.normal_(param, std=std * scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return logits.reshape(-1, logits.shape[-1])


def gpt2_config(**fields: Any) -> Any:
    """A ``transformers.GPT2Config`` (only the configuration class is imported), or a plain
    namespace with the same fields when transformers is not installed."""
    try:
        from transformers import GPT2Config
    except ImportError:
        from types import SimpleNamespace

        defaults = dict(
            n_layer=12,
            n_embd=768,
            n_head=12,
            vocab_size=50257,
            n_positions=1024,
            layer_norm_epsilon=1e-5,
            initializer_range=0.02,
        )
        return SimpleNamespace(**{**defaults, **fields})
    return GPT2Config(**fields)


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "smoke": {"sizes": (8, 16, 3), "batch": 16},
        "cpu": {"sizes": (128, 256, 256, 10), "batch": 256},
        "cuda": {"sizes": (128, 256, 256, 10), "batch": 2048},
    },
    "mlp-small": {
        "smoke": {"sizes": (6, 10, 3), "batch": 64, "train_steps": 40},
        "cpu": {"sizes": (16, 48, 32, 10), "batch": 512, "train_steps": 60},
        "cuda": {"sizes": (16, 48, 32, 10), "batch": 512, "train_steps": 60},
    },
    "cnn": {
        "smoke": {"widths": (4, 6), "image": 6, "batch": 4},
        "cpu": {"widths": (32, 64, 128, 256), "image": 32, "batch": 8},
        "cuda": {"widths": (32, 64, 128, 256), "image": 32, "batch": 256},
    },
    "gpt": {
        "smoke": {"n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 24, "seq": 6, "batch": 2},
        "cpu": {
            "n_layer": 4,
            "n_embd": 384,
            "n_head": 6,
            "vocab_size": 8192,
            "seq": 64,
            "batch": 4,
        },
        "cuda": {
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "seq": 256,
            "batch": 8,
        },
    },
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _build_mlp(
    preset: dict[str, Any], seed: int, gen: torch.Generator
) -> tuple[nn.Module, list[Any], str]:
    sizes = tuple(preset["sizes"])
    torch.manual_seed(seed)
    model = MLP(sizes)
    inputs = torch.randn(preset["batch"], sizes[0], generator=gen)
    teacher = torch.randn(sizes[0], sizes[-1], generator=gen)
    targets = (inputs @ teacher).argmax(dim=1)
    arch = "-".join(str(s) for s in sizes)
    return model, [(inputs, targets)], f"GELU MLP {arch}, batch {preset['batch']}"


def _build_cnn(
    preset: dict[str, Any], seed: int, gen: torch.Generator
) -> tuple[nn.Module, list[Any], str]:
    widths = tuple(preset["widths"])
    torch.manual_seed(seed)
    model = ResNetish(widths)
    size = preset["image"]
    inputs = torch.randn(preset["batch"], 3, size, size, generator=gen)
    targets = torch.randint(0, 10, (preset["batch"],), generator=gen)
    model.train()
    with torch.no_grad():  # calibrate BatchNorm statistics on the data, then freeze them
        for _ in range(3):
            model(inputs + 0.1 * torch.randn(inputs.shape, generator=gen))
    arch = "-".join(str(w) for w in widths)
    desc = f"ResNet-ish {arch}, eval BatchNorm, {size}x{size} images, batch {preset['batch']}"
    return model, [(inputs, targets)], desc


def _build_gpt(
    preset: dict[str, Any], seed: int, gen: torch.Generator
) -> tuple[nn.Module, list[Any], str]:
    fields = {k: preset[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    special = preset["vocab_size"] - 1  # GPT2Config's default 50256 is outside small vocabularies
    config = gpt2_config(
        **fields, n_positions=max(preset["seq"], 8), bos_token_id=special, eos_token_id=special
    )
    torch.manual_seed(seed)
    model = GPT(config)
    batch, seq = preset["batch"], preset["seq"]
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1).contiguous()
    desc = (
        f"GPT-2-style {config.n_layer}L/{config.n_embd}d/{config.n_head}h, vocab "
        f"{config.vocab_size}, batch {batch} x {seq} tokens"
    )
    return model, [(inputs, targets)], desc


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, list[Any], str]]] = {
    "mlp": _build_mlp,
    "mlp-small": _build_mlp,
    "cnn": _build_cnn,
    "gpt": _build_gpt,
}


def _train(problem: Problem, steps: int, lr: float = 3e-3) -> float:
    """A few full-batch Adam steps so the spectrum looks like a trained net's (outliers above a
    bulk); returns the final loss."""
    optimizer = torch.optim.Adam(problem.params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss()
        loss.backward()
        optimizer.step()
    for param in problem.params:
        param.grad = None
    with torch.no_grad():
        return float(problem.loss())


def make_problem(
    name: str,
    tier: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch_size: int | None = None,
    seq_len: int | None = None,
    train_steps: int | None = None,
) -> Problem:
    """Build problem ``name`` at size ``tier`` ("smoke", "cpu" or "cuda") on ``device``.

    ``batch_size``, ``seq_len`` (transformer only) and ``train_steps`` (full-batch Adam steps
    before the curvature is taken) override the preset. Data and weights are
    drawn on the CPU from ``seed`` and then moved, so CPU and GPU see the same numbers.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if tier not in SIZE_TIERS:
        raise ValueError(f"unknown size tier {tier!r}; choose from {', '.join(SIZE_TIERS)}")
    preset = dict(PRESETS[name][tier])
    if batch_size is not None:
        preset["batch"] = int(batch_size)
    if seq_len is not None and "seq" in preset:
        preset["seq"] = int(seq_len)
    if train_steps is not None:
        preset["train_steps"] = int(train_steps)
    gen = _generator(seed)
    model, batches, description = _BUILDERS[name](preset, seed, gen)
    problem = Problem(
        name=name,
        description=description,
        model=model.eval(),
        batches=batches,
        criterion=nn.CrossEntropyLoss(),
        rows_per_input=int(preset.get("seq", 1)),
        extra={"preset": preset},
    )
    if preset.get("train_steps"):  # train in float64 on the CPU, then cast
        _move(problem, torch.device("cpu"), torch.float64)
        final_loss = _train(problem, int(preset["train_steps"]))
        problem.description += (
            f", trained {preset['train_steps']} Adam steps (loss {final_loss:.3f})"
        )
    _move(problem, torch.device(device), dtype)
    return problem


def _move(problem: Problem, device: torch.device, dtype: torch.dtype) -> None:
    """Move the model and floating-point inputs to ``device`` and ``dtype`` (in place)."""
    problem.model.to(device=device, dtype=dtype)
    problem.batches = [
        (
            inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device),
            targets.to(device),
        )
        for inputs, targets in problem.batches
    ]
