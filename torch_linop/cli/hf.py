"""``--hf-config NAME|PATH``: a HuggingFace causal LM built offline from a configuration, on
synthetic token sequences. Nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torch_linop.cli.errors import UsageError
from torch_linop.cli.workload import Workload

NUM_SEQUENCES = 8
BATCH_SIZE = 4
SEQUENCE_LENGTH = 32


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip


def _tiny_llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip


TINY_CONFIGS: dict[str, Callable[[], Any]] = {"gpt2": _tiny_gpt2, "llama": _tiny_llama}


def hide_broken_torchvision() -> str | None:
    """If torchvision is installed but cannot be imported (say a CUDA wheel next to a CPU-only
    torch), make it look absent, as transformers would otherwise fail to import its models.
    Returns the import error, or None when torchvision is fine or absent."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # a broken binary raises OSError, RuntimeError, ...
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]  # find_spec -> None
        return f"{type(error).__name__}: {error}"
    return None


def _transformers() -> Any:
    broken = hide_broken_torchvision()
    if broken is not None:
        print(
            f"torch-linop: torchvision is installed but broken ({broken}); continuing without it",
            file=sys.stderr,
        )
    try:
        import transformers
    except ImportError:
        raise UsageError(
            '--hf-config needs HuggingFace transformers: pip install "torch-linop[transformers]"'
        ) from None
    return transformers


def load_config(name_or_path: str, random_init: bool) -> tuple[Any, str]:
    """A config from a local directory (or config.json), else from the built-in tiny table."""
    transformers = _transformers()
    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"--hf-config {name_or_path}: cannot read a config there ({error})"
            ) from None
        return config, f"config from {path}"
    if name_or_path not in TINY_CONFIGS:
        raise UsageError(
            f"--hf-config {name_or_path!r} is neither a local directory nor a built-in tiny "
            f"config ({', '.join(TINY_CONFIGS)}); torch-linop never downloads, so for other "
            "models save the config locally (config.save_pretrained(dir)) and pass the directory"
        )
    if not random_init:
        raise UsageError(
            f"--hf-config {name_or_path}: pretrained weights would have to be downloaded and "
            "torch-linop never downloads; add --hf-random-init for a tiny randomly initialised "
            "model, or pass a local directory holding config.json and the weights"
        )
    return TINY_CONFIGS[name_or_path](), f"tiny {name_or_path} config"


def synthetic_tokens(vocab_size: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Arithmetic progressions modulo the vocabulary (random start and stride per sequence): a
    task a small model can learn, so brief training moves it somewhere meaningful."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab_size, (NUM_SEQUENCES, 1), generator=generator)
    strides = torch.randint(1, 5, (NUM_SEQUENCES, 1), generator=generator)
    tokens = (starts + strides * torch.arange(length)) % vocab_size
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in tokens.split(BATCH_SIZE)
    ]


def _describe(model: Any, config: Any, source: str, random_init: bool) -> str:
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", "?")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", "?")
    weights = "random init" if random_init else "local weights"
    return (
        f"{type(model).__name__} ({layers} layers, width {width}, vocab {config.vocab_size}; "
        f"{source}, {weights})"
    )


def hf_workload(name_or_path: str, random_init: bool, seed: int) -> Workload:
    """A causal LM from ``name_or_path`` with synthetic token batches and ``hf_lm_loss``."""
    transformers = _transformers()
    from torch_linop.losses.language_models import hf_lm_loss

    config, source = load_config(name_or_path, random_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if random_init:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    name_or_path, local_files_only=True
                )
            except (OSError, ValueError) as error:
                raise UsageError(
                    f"--hf-config {name_or_path}: no usable weights there ({error}); add "
                    "--hf-random-init to start from random weights"
                ) from None
    model.eval()
    max_positions: int = (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or SEQUENCE_LENGTH
    )
    length = min(SEQUENCE_LENGTH, int(max_positions))
    data = synthetic_tokens(int(config.vocab_size), length, seed)
    return Workload(
        model=model,
        data=data,
        loss=hf_lm_loss(),
        model_name=_describe(model, config, source, random_init),
        data_name=f"synthetic token sequences ({NUM_SEQUENCES} x {length} tokens, "
        f"{len(data)} batches)",
        sample_name="target tokens",
        default_train_steps=0,
        learning_rate=3e-3,
    )
