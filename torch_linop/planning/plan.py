"""``plan``: per-rank memory of exact curvature products and of a Lanczos basis for a
HuggingFace causal LM, predicted on the meta device before anything is loaded, with the largest
micro-batch and basis that fit and, for what does not fit, the knob that fixes it.

What is measured and what is modelled: parameter counts come from the model built on meta; the
product's workspace (activations, the gradient graph, dual tensors, the cross-entropy middle's
float32 logits, the result) from rehearsing the library's own product code on meta
(:mod:`torch_linop.planning.footprint`), checked on CPU against the RSS of real products
(``benchmarks/planner_rss.py``). Modelled, not yet checked by a run: FSDP2's sharding (parameter-
sized buffers divided by the world size, plus two gathered units of parameters and gradients),
activation checkpointing (one layer's workspace plus two hidden-state tensors per layer) and the
fused LM head (the logits at the peak removed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torch_linop.planning.configs import LLAMA_SIZES, llama_config
from torch_linop.planning.footprint import Footprint, footprint
from torch_linop.planning.rehearsal import CURVATURES, meta_model

GIB = 2**30
DEVICE_HEADROOM = 0.10  # CUDA context, allocator fragmentation, NCCL buffers
HOST_HEADROOM = 0.10  # the OS, the data loader, pinned staging buffers
BASIS_DEVICES = ("cuda", "cpu")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Plan:
    """Per-rank memory of one product and of the solver's basis (bytes), and the choices made.

    ``product_peak_bytes`` is the device peak of one product: parameters, gathered FSDP units,
    the input vector and the product's workspace; ``device_peak_bytes`` adds the basis when it
    lives on the device. ``problems`` says what does not fit and which knob fixes it (empty when
    the plan fits).
    """

    name: str
    curvature: str
    world_size: int
    num_params: int
    dtype: torch.dtype
    seq_len: int
    micro_batch: int
    num_micro_batches: int
    parameter_bytes: int
    gathered_bytes: int
    vector_bytes: int
    workspace_bytes: int
    logits_bytes: int
    activation_checkpointing: bool
    fused_head: bool
    basis_vectors: int
    basis_wanted: int
    basis_dtype: torch.dtype
    basis_device: str
    basis_bytes: int
    device_memory: int | None
    host_memory: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def product_peak_bytes(self) -> int:
        return self.parameter_bytes + self.gathered_bytes + self.vector_bytes + self.workspace_bytes

    @property
    def device_peak_bytes(self) -> int:
        on_device = self.basis_bytes if self.basis_device == "cuda" else 0
        return self.product_peak_bytes + on_device

    @property
    def fits(self) -> bool:
        return not self.problems

    def row(self) -> list[str]:
        """One markdown table row (see :meth:`header`)."""
        basis = f"{self.basis_vectors} on {self.basis_device} ({self.basis_bytes / GIB:.1f})"
        return [
            self.name,
            f"{self.num_params / 1e9:.2f}B",
            f"{self.world_size} x {_gib(self.device_memory)}",
            self.curvature,
            f"{self.micro_batch} x {self.seq_len} (x{self.num_micro_batches})",
            f"{self.parameter_bytes / GIB:.1f}",
            f"{self.workspace_bytes / GIB:.1f} ({self.logits_bytes / GIB:.1f})",
            basis,
            f"{self.device_peak_bytes / GIB:.1f}",
            "yes" if self.fits else "no: " + " ".join(self.problems),
        ]

    @staticmethod
    def header() -> str:
        columns = [
            "model",
            "params",
            "GPUs x GB",
            "curvature",
            "micro-batch (count)",
            "params GiB/rank",
            "product workspace GiB (logits)",
            "basis vectors (GiB/rank)",
            "device peak GiB/rank",
            "fits",
        ]
        return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)

    def table(self) -> str:
        """This plan as a one-row markdown table."""
        return self.header() + "\n| " + " | ".join(self.row()) + " |"


def _gib(num_bytes: int | None) -> str:
    return "unlimited" if num_bytes is None else f"{num_bytes / 1e9:.0f}"


def _config_of(model_or_config: Any) -> tuple[str, Any]:
    if isinstance(model_or_config, str):
        return model_or_config, llama_config(model_or_config)
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if config is None:
            raise TypeError(
                "plan() needs a HuggingFace causal LM (a module with .config) or its config; "
                f"got {type(model_or_config).__name__} without one"
            )
        return type(model_or_config).__name__, config
    if hasattr(model_or_config, "num_hidden_layers") and hasattr(model_or_config, "vocab_size"):
        return getattr(model_or_config, "model_type", "model"), model_or_config
    raise TypeError(
        "plan() takes a model name from LLAMA_SIZES "
        f"({sorted(LLAMA_SIZES)}), a HuggingFace config or a model with .config; "
        f"got {type(model_or_config).__name__}"
    )


def _parameter_counts(config: Any) -> tuple[int, int]:
    """(entries of all distinct parameters, entries of the largest FSDP unit: a decoder layer,
    the embedding or the head), from the model built on meta."""
    model = meta_model(config, torch.float32)
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    ends: list[Any] = [model.get_input_embeddings(), model.get_output_embeddings()]
    units = [
        sum(param.numel() for param in module.parameters()) for module in ends if module is not None
    ]
    for module in model.modules():  # the decoder layers: FSDP2 wraps each one as a unit
        if isinstance(module, nn.ModuleList) and len(module) == config.num_hidden_layers:
            units.append(sum(param.numel() for param in module[0].parameters()))
            break
    return total, max(units)


def _workspace(
    fit: Footprint,
    num_layers: int,
    micro_batch: int,
    world_size: int,
    *,
    checkpointing: bool,
    fused_head: bool,
    hidden_bytes: int,
) -> tuple[int, int]:
    """(workspace bytes per rank, logits bytes in it) under the chosen knobs."""
    per_rank_params = fit.parameter_sized(num_layers) // world_size
    if checkpointing:  # one layer recomputed at a time; its input and tangent kept per layer
        tokens = fit.token_sized(1, micro_batch) + 2 * hidden_bytes * micro_batch * num_layers
    else:
        tokens = fit.token_sized(num_layers, micro_batch)
    logits = fit.logits_per_sequence * micro_batch
    if fused_head:
        tokens, logits = max(0, tokens - logits), 0
    return per_rank_params + tokens, logits


def plan(
    model_or_config: Any,
    *,
    world_size: int = 1,
    device_memory: int | None = 80 * 10**9,
    host_memory: int | None = 560 * 10**9,
    seq_len: int = 2048,
    tokens_per_rank: int | None = None,
    micro_batch: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    curvature: str = "hessian",
    solver: str = "lanczos",
    k: int = 10,
    basis_device: str = "cuda",
    basis_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    fused_head: bool = False,
) -> Plan:
    """Predict per-rank peak memory of one ``curvature`` product and of a ``solver`` basis.

    ``device_memory`` is per GPU (bytes; None: no limit), ``host_memory`` per node, shared by
    the ``world_size`` ranks of one node. ``tokens_per_rank`` (default one sequence) is this
    rank's data; ``micro_batch`` (sequences per product pass, default the largest that fits)
    splits it. The basis holds up to the solver's default ``max(100, 4 k, k + 4)`` vectors and at
    least ``k + 2``, in ``basis_dtype`` on ``basis_device``, sharded over the ranks.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if solver != "lanczos":
        raise ValueError(f"only solver='lanczos' is planned so far, got {solver!r}")
    if basis_device not in BASIS_DEVICES:
        raise ValueError(f"basis_device must be one of {BASIS_DEVICES}, got {basis_device!r}")
    if world_size < 1 or k < 1 or seq_len < 1:
        raise ValueError(
            f"world_size, k and seq_len must be >= 1, got {world_size}, {k}, {seq_len}"
        )
    tokens_per_rank = seq_len if tokens_per_rank is None else tokens_per_rank
    max_sequences = max(1, tokens_per_rank // seq_len)
    if micro_batch is not None and not 1 <= micro_batch <= max_sequences:
        raise ValueError(
            f"micro_batch={micro_batch} sequences must be in [1, {max_sequences}] "
            f"(tokens_per_rank={tokens_per_rank} // seq_len={seq_len})"
        )
    name, config = _config_of(model_or_config)
    num_params, largest_unit = _parameter_counts(config)
    num_layers = config.num_hidden_layers
    fit = footprint(config, curvature, seq_len=seq_len, dtype=dtype)
    element = _bytes(dtype)
    shard = -(-num_params // world_size)
    parameter_bytes = shard * element
    vector_bytes = shard * element
    gathered_bytes = 0 if world_size == 1 else 2 * 2 * largest_unit * element
    hidden_bytes = seq_len * config.hidden_size * element
    usable_device = None if device_memory is None else int(device_memory * (1 - DEVICE_HEADROOM))
    usable_host = (
        None if host_memory is None else int(host_memory * (1 - HOST_HEADROOM)) // world_size
    )
    row_bytes = shard * _bytes(basis_dtype)
    basis_wanted = max(100, 4 * k, k + 4)
    basis_minimum = k + 2

    def product_peak(sequences: int, checkpointing: bool, head: bool, ranks: int) -> int:
        work, _ = _workspace(
            fit,
            num_layers,
            sequences,
            ranks,
            checkpointing=checkpointing,
            fused_head=head,
            hidden_bytes=hidden_bytes,
        )
        per_rank = 2 * (-(-num_params // ranks)) * element
        return per_rank + (0 if ranks == 1 else gathered_bytes) + work

    def fits_device(num_bytes: int) -> bool:
        return usable_device is None or num_bytes <= usable_device

    def basis_on_device(vectors: int) -> int:
        return vectors * row_bytes if basis_device == "cuda" else 0

    if micro_batch is None:  # the wanted basis first, then the most sequences per pass
        micro_batch = 1
        for wanted in (basis_wanted, basis_minimum):
            fitting = [
                sequences
                for sequences in range(1, max_sequences + 1)
                if fits_device(
                    product_peak(sequences, activation_checkpointing, fused_head, world_size)
                    + basis_on_device(wanted)
                )
            ]
            if fitting:
                micro_batch = max(fitting)
                break
    workspace_bytes, logits_bytes = _workspace(
        fit,
        num_layers,
        micro_batch,
        world_size,
        checkpointing=activation_checkpointing,
        fused_head=fused_head,
        hidden_bytes=hidden_bytes,
    )
    product_bytes = parameter_bytes + gathered_bytes + vector_bytes + workspace_bytes
    if basis_device == "cuda":
        room = None if usable_device is None else usable_device - product_bytes
    else:
        room = usable_host
    basis_vectors = basis_wanted if room is None else min(basis_wanted, max(0, room) // row_bytes)
    problems: list[str] = []
    if not fits_device(product_bytes):
        problems.append(
            _product_advice(
                product_bytes,
                usable_device,
                activation_checkpointing,
                fused_head,
                world_size,
                micro_batch,
                product_peak,
            )
        )
    elif basis_vectors < basis_minimum:
        host_room = usable_host if basis_device == "cuda" else None
        problems.append(_basis_advice(basis_device, basis_dtype, k, row_bytes, room, host_room))
    return Plan(
        name=name,
        curvature=curvature,
        world_size=world_size,
        num_params=num_params,
        dtype=dtype,
        seq_len=seq_len,
        micro_batch=micro_batch,
        num_micro_batches=-(-max_sequences // micro_batch),
        parameter_bytes=parameter_bytes,
        gathered_bytes=gathered_bytes,
        vector_bytes=vector_bytes,
        workspace_bytes=workspace_bytes,
        logits_bytes=logits_bytes,
        activation_checkpointing=activation_checkpointing,
        fused_head=fused_head,
        basis_vectors=basis_vectors,
        basis_wanted=basis_wanted,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        basis_bytes=basis_vectors * row_bytes,
        device_memory=device_memory,
        host_memory=host_memory,
        problems=problems,
    )


def _product_advice(
    needed: int,
    usable: int | None,
    checkpointing: bool,
    fused_head: bool,
    world_size: int,
    micro_batch: int,
    product_peak: Any,
) -> str:
    """What does not fit about the product, and the knobs (in order of cost) that make it fit."""
    message = (
        f"the product needs {needed / GIB:.1f} GiB per rank at {micro_batch} sequence(s), "
        f"{(usable or 0) / GIB:.1f} GiB usable;"
    )
    knobs = []
    candidates = [
        (
            "activation_checkpointing=True",
            dict(checkpointing=True, head=fused_head, ranks=world_size),
        ),
        ("fused_head=True", dict(checkpointing=checkpointing, head=True, ranks=world_size)),
        ("both", dict(checkpointing=True, head=True, ranks=world_size)),
        (
            f"world_size={2 * world_size}",
            dict(checkpointing=checkpointing, head=fused_head, ranks=2 * world_size),
        ),
    ]
    for knob, options in candidates:
        if knob == "activation_checkpointing=True" and checkpointing:
            continue
        if knob == "fused_head=True" and fused_head:
            continue
        peak = product_peak(1, options["checkpointing"], options["head"], options["ranks"])
        if usable is not None and peak <= usable:
            knobs.append(f"{knob} ({peak / GIB:.1f} GiB)")
    if not knobs:
        return message + " no single knob fixes it: shorten seq_len or add ranks"
    return message + " fix: " + " or ".join(knobs)


def _basis_advice(
    device: str,
    dtype: torch.dtype,
    k: int,
    row_bytes: int,
    room: int | None,
    host_room: int | None,
) -> str:
    """What does not fit about the basis (``k + 2`` vectors at least), and the knobs that fix it:
    the host, a bf16 basis, or the largest ``k`` that fits."""
    minimum = k + 2
    holds = 0 if room is None else max(0, room) // row_bytes
    message = f"the basis needs >= {minimum} vectors on {device}, {holds} fit;"
    fixes = []
    if host_room is not None and host_room >= minimum * row_bytes:
        fixes.append("basis_device='cpu'")
    half_row = row_bytes * 2 // dtype.itemsize
    if dtype.itemsize > 2 and room is not None and room >= minimum * half_row:
        fixes.append("basis_dtype=torch.bfloat16")
    cheapest = half_row if dtype.itemsize > 2 else row_bytes
    best_room = max(room or 0, host_room or 0)
    if 3 <= best_room // cheapest < minimum:
        fixes.append(f"k={best_room // cheapest - 2} (bf16 basis on the larger of device and host)")
    return message + (" fix: " + " or ".join(fixes) if fixes else " add ranks")
