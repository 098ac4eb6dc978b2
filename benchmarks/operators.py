"""Cost of curvature products relative to one gradient, and matmat(k) against k matvecs.

    python benchmarks/operators.py [--repeats 5] [--columns 8] [--threads 1] [--smoke]
                                   [--models mlp,transformer,gpt2]
                                   [--out .bench_out/operators.json]

For an MLP (~100k parameters) and two small causal transformers (~1M parameters: a pre-norm
``nn.TransformerEncoder`` and a GPT-2 from a ``transformers.GPT2Config``) on the CPU in float32,
one run measures:

- the time of one gradient of the dataset loss (``torch.autograd.grad``, the unit);
- for each operator (Hessian by double backward / forward-over-reverse / central differences,
  GGN, empirical Fisher, MC Fisher), one matvec as a multiple of the gradient;
- ``matmat`` with k columns against k separate matvecs (speed-up > 1: batching pays).

Times are medians over ``--repeats`` rounds (more, up to 10x, for fast models: at least 2 s of
timing per operator) after one warm-up; in each round the gradient, the
matvec and the matmat of one operator run back to back, so load changes on a shared machine hit
numerator and denominator alike. Prints a markdown table and writes the numbers, the machine and
the command as JSON. Timings only: correctness is in tests/core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    supervised_loss,
)


class CausalTransformer(nn.Module):
    """Token + position embeddings, a pre-norm causal ``nn.TransformerEncoder`` and a linear
    head; logits come out as ``(batch, vocab, length)`` (class axis 1, for cross-entropy)."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.tokens(ids) + self.positions(positions)
        mask = self.mask[: ids.shape[1], : ids.shape[1]]
        hidden = self.encoder(hidden, mask=mask, is_causal=True)
        return self.head(hidden).transpose(1, 2)


class GPT2Logits(nn.Module):
    """A GPT-2 from a tiny ``transformers.GPT2Config`` (SDPA attention, tied embeddings), with
    logits as ``(batch, vocab, length)``."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        import transformers

        transformers.utils.logging.set_verbosity_error()
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=length,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=ids, use_cache=False).logits.transpose(1, 2)


MODELS = ("mlp", "transformer", "gpt2")


def build_problem(name: str, smoke: bool) -> tuple[nn.Module, list[Any], str]:
    """A seeded model in eval mode, its batches, and a description."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "mlp":
            width = 32 if smoke else 256
            model = nn.Sequential(
                nn.Linear(128, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                nn.Linear(width, 10),
            )  # fmt: skip
            batch = 16 if smoke else 256
            data = [
                (
                    torch.randn(batch, 128, generator=generator),
                    torch.randint(0, 10, (batch,), generator=generator),
                )
            ]
            description = f"MLP 128-{width}-{width}-10, tanh, batch {batch}"
        else:
            vocab, length = (64, 8) if smoke else (256, 32)
            width, layers = (32, 1) if smoke else (128, 4)
            architecture = CausalTransformer if name == "transformer" else GPT2Logits
            model = architecture(vocab, length, width, heads=4, layers=layers)
            batch = 2 if smoke else 8
            ids = torch.randint(0, vocab, (batch, length + 1), generator=generator)
            data = [(ids[:, :-1], ids[:, 1:])]
            kind = "causal nn.TransformerEncoder" if name == "transformer" else "GPT-2"
            description = (
                f"{kind}, {layers} layers, width {width}, 4 heads, vocab {vocab}, "
                f"{batch}x{length} tokens"
            )
    return model.eval(), data, description


def interleaved_medians(
    functions: dict[str, Callable[[], Any]], repeats: int, min_seconds: float = 2.0
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one call of each per round) so that
    load changes on a shared machine hit all of them alike. One warm-up round first (it also
    lets the operators settle on their batched or looped paths); fast functions get more rounds,
    up to ``min_seconds`` of timing in all."""
    start = time.perf_counter()
    for function in functions.values():
        function()
    warm_up = time.perf_counter() - start
    repeats = max(repeats, min(10 * repeats, math.ceil(min_seconds / max(warm_up, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def gradient_function(model: nn.Module, data: list[Any]) -> Callable[[], None]:
    """One gradient of the dataset loss: the unit of cost."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        for inputs, targets in data:
            torch.autograd.grad(F.cross_entropy(model(inputs), targets), params)

    return gradient


OPERATORS: dict[str, tuple[type, dict[str, Any]]] = {
    "Hessian (double backward)": (HessianOperator, {}),
    "Hessian (forward-over-reverse)": (HessianOperator, {"method": "forward"}),
    "Hessian (central differences)": (HessianOperator, {"method": "finite_difference"}),
    "GGN (forward-mode JVP)": (GGNOperator, {}),
    "GGN (double-backward JVP)": (GGNOperator, {"jvp_method": "double_backward"}),
    "Empirical Fisher": (EmpiricalFisherOperator, {}),
    "MC Fisher (1 sample)": (MCFisherOperator, {}),
}


def measure(name: str, columns: int, repeats: int, smoke: bool) -> dict[str, Any]:
    model, data, description = build_problem(name, smoke)
    loss = supervised_loss(F.cross_entropy)
    num_params = sum(p.numel() for p in model.parameters())
    gradient = gradient_function(model, data)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for label, (operator_class, options) in OPERATORS.items():
        operator = operator_class(model, data, loss, **options)
        block = torch.randn(num_params, columns, generator=generator)
        seconds = interleaved_medians(
            {
                "gradient": gradient,
                "matvec": lambda op=operator, v=block[:, 0]: op @ v,
                "matmat": lambda op=operator, b=block: op @ b,
            },
            repeats,
        )
        rows.append(
            {
                "operator": label,
                "gradient_s": seconds["gradient"],
                "matvec_s": seconds["matvec"],
                "matvec_over_gradient": seconds["matvec"] / seconds["gradient"],
                "matmat_s": seconds["matmat"],
                "matmat_over_k_matvecs": seconds["matmat"] / (columns * seconds["matvec"]),
                "speedup_matmat_vs_k_matvecs": columns * seconds["matvec"] / seconds["matmat"],
            }
        )
    return {
        "model": name,
        "description": description,
        "num_params": num_params,
        "gradient_s": statistics.median(row["gradient_s"] for row in rows),
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]], columns: int) -> str:
    lines = [
        f"| model | operator | matvec / gradient | matmat(k={columns}) / {columns} matvecs "
        f"| speed-up of matmat |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        model = f"{result['model']} ({result['num_params'] / 1e3:.0f}k params)"
        for row in result["rows"]:
            lines.append(
                f"| {model} | {row['operator']} | {row['matvec_over_gradient']:.2f}x "
                f"| {row['matmat_over_k_matvecs']:.2f} | {row['speedup_matmat_vs_k_matvecs']:.2f}x |"
            )
    gradients = ", ".join(f"{r['model']}: {1e3 * r['gradient_s']:.1f} ms" for r in results)
    return "\n".join(lines) + f"\n\nOne gradient: {gradients}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared machine OpenMP threads spinning for "
        "a core make timings meaningless; 0 keeps torch's default)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models: checks it runs")
    parser.add_argument(
        "--models", type=lambda text: text.split(","), default=list(MODELS), help=",".join(MODELS)
    )
    parser.add_argument("--out", type=Path, default=Path(".bench_out/operators.json"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    results = [measure(name, args.columns, args.repeats, args.smoke) for name in args.models]
    table = markdown(results, args.columns)
    print(table)
    record = {
        "benchmark": "operators",
        "date": started.isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "dtype": "float32",
        "repeats": args.repeats,
        "columns": args.columns,
        "results": results,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
