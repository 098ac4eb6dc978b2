"""Llama-architecture configurations the planner's table is printed for, written out (no
download): the published sizes of Llama 3.2 1B, Llama 2 7B and 13B, and Llama 3 70B."""

from __future__ import annotations

from typing import Any

LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(  # Llama 3.2 1B: tied input/output embeddings
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(  # Llama 2 7B
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-13b": dict(  # Llama 2 13B
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-70b": dict(  # Llama 3 70B
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def llama_config(name: str, **overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SIZES` (``overrides`` win)."""
    from transformers import LlamaConfig

    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(LLAMA_SIZES)}")
    return LlamaConfig(**{**LLAMA_SIZES[name], "max_position_embeddings": 8192, **overrides})
