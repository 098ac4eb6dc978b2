"""The planner's predicted product workspace against ``torch.cuda.max_memory_allocated`` of the
same product on one GPU (single process, no FSDP), for Llama-style models and GPT-2 small.

    python benchmarks/planner_gpu.py              # prints one markdown table
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch_linop import GGNOperator, HessianOperator, hf_lm_loss  # noqa: E402
from torch_linop.planning import footprint  # noqa: E402

CASES: list[tuple[str, str, dict[str, Any], int, int]] = [
    (
        "llama-0.95B",
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            vocab_size=32000,
        ),
        2,
        256,
    ),
    ("gpt2-small", "gpt2", dict(vocab_size=50257, n_layer=12, n_embd=768, n_head=12), 8, 256),
    ("gpt2-small", "gpt2", dict(vocab_size=50257, n_layer=12, n_embd=768, n_head=12), 8, 512),
]


def build(family: str, sizes: dict[str, Any], meta: bool) -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family == "llama":
        config = LlamaConfig(**sizes, max_position_embeddings=1024)
        model_class: Any = LlamaForCausalLM
    else:
        config = GPT2Config(**sizes, n_positions=1024)
        model_class = GPT2LMHeadModel
    if meta:
        return config, None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class(config).eval()
    return config, model


def measured(model: Any, batch: dict[str, Any], curvature: str, fused: str) -> tuple[float, float]:
    """Peak GiB above parameters + vector: first product (probing) and second."""
    operator_class = HessianOperator if curvature == "hessian" else GGNOperator
    operator = operator_class(model, [batch], hf_lm_loss(fused=fused))
    vector = torch.randn(operator.shape[0], device="cuda")
    peaks = []
    for _ in range(2):
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        operator @ vector
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
    return peaks[0], peaks[1]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(
        "| model | tokens | curvature | CE backend | predicted GiB | measured GiB (1st / 2nd) "
        "| error vs 2nd |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, family, sizes, batch_size, seq in CASES:
        config, model = build(family, sizes, meta=False)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq), generator=generator)
        batch = {"input_ids": tokens.cuda()}
        for curvature in ("hessian", "ggn"):
            fit = footprint(config, curvature, seq_len=seq, dtype=torch.float32)
            predicted = fit.workspace(config.num_hidden_layers, batch_size) / 2**30
            for fused in ("auto", "eager") if curvature == "ggn" else ("auto",):
                first, second = measured(model, batch, curvature, fused)
                print(
                    f"| {name} | {batch_size}x{seq} | {curvature} | {fused} | {predicted:.2f} | "
                    f"{first:.2f} / {second:.2f} | {100 * (predicted - second) / second:+.1f}% |",
                    flush=True,
                )
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
