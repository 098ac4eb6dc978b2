"""Pieces shared by the cross-entropy HVP kernels: Triton device helpers and the autotuners' core.

Device side: where a flattened row lives and whether it has a target, and the loads of one chunk
of a row of logits and tangents. Host side: the arguments every launch passes (tensors, strides,
scale, labels, layout constexprs), views of the leading rows, and the timing loop of the
autotuners (the two-pass and the cluster kernels). ``benchmarks/ce_hvp_designs.py`` builds its
unshipped designs from the same pieces.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl
import triton.testing

__all__ = [
    "LaunchArguments",
    "is_inner_contiguous",
    "is_interpreter",
    "labels_arguments",
    "launch_arguments",
    "leading_rows",
    "load_raw",
    "load_tile",
    "locate_row",
    "median_ms",
    "fastest_config",
    "pick_config",
    "scale_arguments",
    "time_configs",
    "to_acc",
]

Config = TypeVar("Config", bound=Hashable)

AUTOTUNE_ENV = "TORCH_LINOP_CE_HVP_AUTOTUNE"
# One tuning at a time, whichever kernel (re-entrant: a design's tuner may launch a shipped kernel).
_tune_lock = threading.RLock()


@triton.jit
def locate_row(
    row,
    seq_len,
    labels_ptr,
    labels_stride_b,
    labels_stride_t,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """(batch index, position, has a target) of a flattened row; the label decides the last.

    Under ``SHIFT`` row t is scored against the label at t + 1 (none for the last position).
    """
    row = tl.zeros((), dtype=tl.int64) + row  # 64-bit offsets (the loop index may be int32)
    batch_index = row // seq_len
    position = row % seq_len
    if HAS_LABELS:
        if SHIFT:
            label = tl.load(
                labels_ptr + batch_index * labels_stride_b + (position + 1) * labels_stride_t,
                mask=position + 1 < seq_len,
                other=ignore_index,
            )
        else:
            label = tl.load(labels_ptr + batch_index * labels_stride_b + position * labels_stride_t)
        has_target = label != ignore_index
    else:
        if SHIFT:
            has_target = position + 1 < seq_len
        else:
            has_target = position >= 0
    return batch_index, position, has_target


@triton.jit
def load_raw(
    x_row_ptr,
    u_row_ptr,
    x_stride_v,
    u_stride_v,
    chunk,
    vocab_limit,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    EVICT_LAST: tl.constexpr,
):
    """Chunk ``chunk`` of a row of x (masked lanes -inf) and u (masked lanes 0), input dtypes.

    Lanes at or past ``vocab_limit`` (the vocabulary size, or 0 to load nothing) are masked.
    ``EVICT_LAST`` asks L2 to keep the lines (they are read again); otherwise evict them first.
    """
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    in_row = offsets < vocab_limit
    if X_CONTIG:
        x_ptrs = x_row_ptr + offsets
    else:
        x_ptrs = x_row_ptr + offsets.to(tl.int64) * x_stride_v
    if U_CONTIG:
        u_ptrs = u_row_ptr + offsets
    else:
        u_ptrs = u_row_ptr + offsets.to(tl.int64) * u_stride_v
    if EVICT_LAST:
        x = tl.load(x_ptrs, mask=in_row, other=-float("inf"), eviction_policy="evict_last")
        u = tl.load(u_ptrs, mask=in_row, other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(x_ptrs, mask=in_row, other=-float("inf"), eviction_policy="evict_first")
        u = tl.load(u_ptrs, mask=in_row, other=0.0, eviction_policy="evict_first")
    return x, u


@triton.jit
def to_acc(x, u, ACC_FP64: tl.constexpr):
    """Cast a raw tile to the accumulation type (a no-op for float32 inputs).

    One ``return`` after both branches: Triton compiles every ``return`` it meets, also one after
    a taken constexpr branch, and refuses two of different types (the fp64 path did not compile).
    """
    if ACC_FP64:
        x = x.to(tl.float64)
        u = u.to(tl.float64)
    else:
        x = x.to(tl.float32)
        u = u.to(tl.float32)
    return x, u


@triton.jit
def load_tile(
    x_row_ptr,
    u_row_ptr,
    x_stride_v,
    u_stride_v,
    chunk,
    vocab,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    EVICT_LAST: tl.constexpr,
):
    """``load_raw`` of a whole chunk, in the accumulation type."""
    x, u = load_raw(
        x_row_ptr,
        u_row_ptr,
        x_stride_v,
        u_stride_v,
        chunk,
        vocab,
        BLOCK,
        X_CONTIG,
        U_CONTIG,
        EVICT_LAST,
    )
    return to_acc(x, u, ACC_FP64)


def is_interpreter() -> bool:
    """True when Triton was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
    return type(locate_row).__name__ == "InterpretedFunction"


def is_inner_contiguous(tensor: torch.Tensor) -> bool:
    """Unit stride along the vocabulary (or at most one entry): 16-byte vector loads possible."""
    return tensor.shape[-1] <= 1 or tensor.stride(-1) == 1


def scale_arguments(
    scale: torch.Tensor | float, acc_dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, float, bool]:
    """(scale tensor, scale value, SCALE_IN_MEMORY) as the kernels take them.

    A device scalar is read in the kernel; a Python float is passed by value, except for float64
    accumulation: a float argument reaches the kernel rounded to float32, so it goes to memory.
    """
    in_memory = isinstance(scale, torch.Tensor) or acc_dtype == torch.float64
    if isinstance(scale, torch.Tensor):
        scale_tensor = scale.to(acc_dtype)
    elif in_memory:
        scale_tensor = torch.full((), float(scale), dtype=torch.float64, device=device)
    else:
        scale_tensor = torch.empty(1, dtype=acc_dtype, device=device)
    return scale_tensor, 1.0 if in_memory else float(scale), in_memory


def labels_arguments(
    labels: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The labels and their (batch, time) strides; a placeholder and (0, 0) without labels."""
    if labels is None:
        return torch.empty(1, dtype=torch.int64, device=device), (0, 0)
    return labels, labels.stride()


@dataclass(frozen=True)
class LaunchArguments:
    """The arguments every ce_hvp kernel takes in the same form, built once per launch.

    A kernel's parameters are ``pointers``, then its own integers, then ``scalars``; its
    constexprs are ``constexprs`` plus its own (chunk size and the like).
    """

    logits: torch.Tensor
    u: torch.Tensor
    out: torch.Tensor
    labels: torch.Tensor  # a placeholder without labels
    labels_strides: tuple[int, ...]
    ignore_index: int
    scale_tensor: torch.Tensor
    scale_value: float
    acc_dtype: torch.dtype
    constexprs: dict[str, bool]  # HAS_LABELS, SHIFT, SCALE_IN_MEMORY, X/U/OUT_CONTIG, ACC_FP64

    @property
    def pointers(self) -> tuple[torch.Tensor, ...]:
        """x, u, out, labels and scale pointers."""
        return (self.logits, self.u, self.out, self.labels, self.scale_tensor)

    @property
    def scalars(self) -> tuple[int | float, ...]:
        """Strides of x, u, out and labels, ignore_index and the scale value."""
        return (
            *self.logits.stride(),
            *self.u.stride(),
            *self.out.stride(),
            *self.labels_strides,
            self.ignore_index,
            self.scale_value,
        )


def launch_arguments(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
) -> LaunchArguments:
    """``LaunchArguments`` of a call (tensors (B, T, V), labels (B, T) or None)."""
    acc_fp64 = torch.float64 in (logits.dtype, u.dtype)
    acc_dtype = torch.float64 if acc_fp64 else torch.float32
    scale_tensor, scale_value, scale_in_memory = scale_arguments(scale, acc_dtype, logits.device)
    labels_arg, labels_strides = labels_arguments(labels, logits.device)
    return LaunchArguments(
        logits=logits,
        u=u,
        out=out,
        labels=labels_arg,
        labels_strides=labels_strides,
        ignore_index=ignore_index,
        scale_tensor=scale_tensor,
        scale_value=scale_value,
        acc_dtype=acc_dtype,
        constexprs=dict(
            HAS_LABELS=labels is not None,
            SHIFT=shift,
            SCALE_IN_MEMORY=scale_in_memory,
            X_CONTIG=is_inner_contiguous(logits),
            U_CONTIG=is_inner_contiguous(u),
            OUT_CONTIG=is_inner_contiguous(out),
            ACC_FP64=acc_fp64,
        ),
    )


def leading_rows(tensor: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """A view of about ``num_rows`` leading rows of a (B, T, ...) tensor (no copy)."""
    if tensor is None:
        return None
    batch, seq_len = tensor.shape[0], tensor.shape[1]
    if batch > 1:
        return tensor[: max(1, min(batch, num_rows // seq_len))]
    return tensor[:, : min(seq_len, num_rows)]


def median_ms(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 5, rep: int = 25
) -> float:
    """Median ms of ``fn``: ``do_bench`` on CUDA (L2 flushed), three wall-clock runs elsewhere."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def time_configs(
    launch: Callable[..., object],
    candidates: Iterable[Config],
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    tune_rows: int | None,
    failed: dict[Config, str] | None = None,
) -> dict[Config, float]:
    """Median ms of ``launch(logits, u, labels, out, config=config)`` for every candidate config.

    ``tune_rows``: time on about that many leading rows (``None``: all rows). Writes into ``out``,
    or into a scratch buffer when ``out`` aliases ``u`` (the in-place mode), so tuning never
    changes u. A candidate that fails to compile or run is skipped (its error goes to ``failed``).
    """
    if tune_rows is not None:
        labels = leading_rows(labels, tune_rows)
        logits, u, out = (_leading_view(tensor, tune_rows) for tensor in (logits, u, out))
    if out.data_ptr() == u.data_ptr():
        out = torch.empty(u.shape, dtype=out.dtype, device=out.device)
    timings: dict[Config, float] = {}
    for config in candidates:

        def run(config: Config = config) -> None:
            launch(logits, u, labels, out, config=config)

        try:
            timings[config] = median_ms(run, logits.device)
        except Exception as error:  # e.g. out of registers or shared memory for this config
            if failed is not None:
                failed[config] = f"{type(error).__name__}: {error}"[:300]
    return timings


def fastest_config(
    launch: Callable[..., object],
    candidates: Iterable[Config],
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    tune_rows: int | None,
    kernel_name: str,
    failed: dict[Config, str] | None = None,
) -> tuple[Config, dict[Config, float]]:
    """The fastest candidate and every candidate's median ms (``time_configs``); raises when
    none ran (each kernel's tuner, so that none writes this out again)."""
    timings = time_configs(
        launch, candidates, logits, u, labels, out, tune_rows=tune_rows, failed=failed
    )
    if not timings:
        raise RuntimeError(f"ce_hvp {kernel_name}: no candidate config ran (V={logits.shape[-1]})")
    return min(timings, key=timings.__getitem__), timings


def pick_config(
    key: tuple,
    picks: dict[tuple, Config],
    timings: dict[tuple, dict[Config, float]],
    default: Callable[[], Config],
    tune: Callable[[], tuple[Config, dict[Config, float]]],
) -> Config:
    """The config of a launch: ``default()`` in the interpreter or with
    TORCH_LINOP_CE_HVP_AUTOTUNE=0, else ``picks[key]``, found by ``tune()`` (best config and
    every candidate's ms, kept in ``timings[key]``) on the first call for ``key``."""
    if is_interpreter() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return default()
    with _tune_lock:
        if key not in picks:
            picks[key], timings[key] = tune()
        return picks[key]


def _leading_view(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    view = leading_rows(tensor, num_rows)
    assert view is not None
    return view
