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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two, and robust on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def jacrev_ce_ggn(model, data, logits_fn, valid_fn, param_filter=None) -> torch.Tensor:
    """Token-weighted cross-entropy GGN from explicit logit Jacobians (``jacrev``) and per-row
    softmax Hessians ``diag(p) - p p^T``, sharing no code with the library's products.
    ``logits_fn(model, batch)`` runs the model; ``valid_fn(batch)`` is the (B, T) mask of
    logit rows that have a target."""
    from torch.func import functional_call, jacrev

    from torch_linop._context import differentiable_attention
    from torch_linop.params import select_parameters

    params = select_parameters(model, param_filter)
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    wrapper = _CallWith(model, logits_fn)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    count = 0
    for batch in data:

        def logits_at(vector: torch.Tensor, batch=batch) -> torch.Tensor:
            values = {
                f"model.{n}": c.view(s) for n, c, s in zip(names, vector.split(sizes), shapes)
            }
            return functional_call(wrapper, values, (batch,))

        with differentiable_attention():
            logits = logits_at(flat).detach()
            jacobian = jacrev(logits_at)(flat)  # (B, T, V, n)
        for b, t in valid_fn(batch).nonzero().tolist():
            probs = torch.softmax(logits[b, t], dim=-1)
            row_hessian = torch.diag(probs) - torch.outer(probs, probs)
            total += jacobian[b, t].T @ row_hessian @ jacobian[b, t]
            count += 1
    return total / count


class _CallWith(torch.nn.Module):
    """``logits_fn(model, batch)`` as a module, so ``functional_call`` can swap parameters."""

    def __init__(self, model, logits_fn) -> None:
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, batch):
        return self.logits_fn(self.model, batch)


@pytest.fixture
def ce_ggn_oracle():
    return jacrev_ce_ggn
