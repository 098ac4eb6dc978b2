"""Tiny float64 language models for the LM-loss tests, built from configs (no download).

If the installed torchvision cannot be imported (a CUDA wheel next to a CPU-only torch),
transformers would fail on import; it is then hidden so transformers treats it as absent.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch


def _hide_broken_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # broken binary: OSError, RuntimeError, ...
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # find_spec now answers None: "not installed"


_hide_broken_torchvision()

VOCAB = 13


def tiny_gpt2(attn_implementation: str = "sdpa", seed: int = 0, n_layer: int = 1):
    """A float64 GPT-2 with 8-dim embeddings, 2 heads and a 13-token vocabulary."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).to(torch.float64).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


def tiny_tlens(seed: int = 0):
    """A float64 TransformerLens model: a ``HookedTransformer`` (TransformerLens < 4) or a
    native ``TransformerBridge`` (TransformerLens 4), one layer, d_model 8, vocabulary 11."""
    transformer_lens = pytest.importorskip("transformer_lens")
    fields = dict(
        n_layers=1,
        d_model=8,
        d_head=4,
        n_heads=2,
        d_mlp=16,
        d_vocab=11,
        n_ctx=8,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # TransformerLens 4: the bridge around a TL-native model
        from transformer_lens import TransformerBridge, TransformerBridgeConfig
        from transformer_lens.model_bridge.sources import native  # noqa: F401 (boot_native)

        model = TransformerBridge.boot_native(
            TransformerBridgeConfig(**fields), dtype=torch.float64
        )
    else:
        model = HookedTransformer(HookedTransformerConfig(**fields, dtype=torch.float64))
    del transformer_lens
    return model.eval()


@pytest.fixture
def make_gpt2():
    return tiny_gpt2


@pytest.fixture
def make_tlens():
    return tiny_tlens


def token_batch(generator: torch.Generator, batch: int, seq: int, vocab: int = VOCAB):
    return torch.randint(0, vocab, (batch, seq), generator=generator)


@pytest.fixture
def padded_data():
    """Two batches with uneven numbers of valid targets: right padding in the first, an
    explicit ignore_index label in the second, and different shapes."""
    generator = torch.Generator().manual_seed(1)
    ids_a = token_batch(generator, 2, 6)
    mask_a = torch.ones_like(ids_a)
    mask_a[1, 3:] = 0  # 3 real tokens then padding
    ids_b = token_batch(generator, 3, 5)
    labels_b = ids_b.clone()
    labels_b[0, 2] = -100
    labels_b[2, 4] = -100
    return [
        {"input_ids": ids_a, "attention_mask": mask_a},
        {"input_ids": ids_b, "labels": labels_b},
    ]
