"""The Triton kernel for the cross-entropy HVP in every float dtype: two passes per row.

Per row r with a target and p = softmax(x_r): ``out_r = scale * (p * u_r - p * <p, u_r>)``; the
other rows are exact zeros. Persistent programs (as many as the GPU holds at once, sized from the
compiled kernel's registers, threads and shared memory) walk the rows, one row per program at a
time. Pass 1 streams the row's chunks computing the online-softmax max, normaliser and <p, u>
with loads marked ``evict_last``; pass 2 walks the chunks in reverse (the latest are the likeliest
still in L2), loading with ``evict_first``, and writes the output. The second read mostly hits L2,
so the traffic reaching memory is close to the floor's (x and u read once, out written once), with
no exchange between programs.

Triton does not software-pipeline the loads of these loops (no cp.async in the PTX, whatever
``num_stages`` says), so a program has one chunk in flight unless ``prefetch`` is on: then it
issues the next chunk's loads before reducing the current one (two chunks in flight, more
registers). The chunk size, warps, programs per SM and prefetch are autotuned among a few configs
per problem signature. float64 inputs accumulate in float64. On sm_90 GPUs the cluster kernel
(``_ce_hvp_cluster``) takes the contiguous fp32/bf16/fp16 calls with long rows instead.

The causal shift and ignore_index are applied inside the kernel and all tensors are addressed
through their strides. ``benchmarks/ce_hvp_designs.py`` compares this design with unshipped ones.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._ce_hvp_common import (
    fastest_config,
    is_interpreter,
    launch_arguments,
    load_raw,
    load_tile,
    locate_row,
    pick_config,
    to_acc,
)

__all__ = [
    "TwoPassConfig",
    "candidate_configs",
    "ce_hvp_two_pass",
    "default_config",
    "launch",
    "persistent_programs",
    "resident_programs",
    "tune",
]


# ----------------------------------------------------------------------------------------------
# Device side: the row's two passes.


@triton.jit
def store_tile(
    out_row_ptr, out_stride_v, chunk, vocab, values, BLOCK: tl.constexpr, OUT_CONTIG: tl.constexpr
):
    """Write one chunk of an output row (values cast to the output dtype), ``evict_first``.

    (The split-row design in ``benchmarks/ce_hvp_split.py`` stores without a hint.)
    """
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    if OUT_CONTIG:
        out_ptrs = out_row_ptr + offsets
    else:
        out_ptrs = out_row_ptr + offsets.to(tl.int64) * out_stride_v
    tl.store(
        out_ptrs,
        values.to(out_row_ptr.dtype.element_ty),
        mask=offsets < vocab,
        eviction_policy="evict_first",
    )


@triton.jit
def initial_stats(ACC_FP64: tl.constexpr):
    """(max, norm, dot) of an empty set: (-inf, 0, 0) in the accumulation type."""
    if ACC_FP64:
        zero = tl.zeros((), dtype=tl.float64)
    else:
        zero = tl.zeros((), dtype=tl.float32)
    return zero - float("inf"), zero, zero


@triton.jit
def merge_tile(run_max, run_norm, run_dot, x, u):
    """Online-softmax update of (max, sum exp(x - max), sum exp(x - max) u) with one tile.

    A max of -inf (only masked or -inf logits so far) is shifted to 0 so that exp never sees
    -inf - (-inf); such a set has zero sums and drops out of the merge.
    """
    new_max = tl.maximum(run_max, tl.max(x, 0))
    safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
    exps = tl.exp(x - safe_max)
    rescale = tl.exp(run_max - safe_max)
    new_norm = run_norm * rescale + tl.sum(exps, 0)
    new_dot = run_dot * rescale + tl.sum(exps * u, 0)
    return new_max, new_norm, new_dot


@triton.jit
def segment_stats(
    x_row_ptr,
    u_row_ptr,
    x_stride_v,
    u_stride_v,
    first_chunk,
    end_chunk,
    vocab,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """(max, norm, dot) of chunks [first_chunk, end_chunk) of a row, loads kept in L2.

    ``PREFETCH``: the next chunk's loads are issued before the current chunk is reduced, so
    two chunks are in flight per program (Triton does not pipeline these loads by itself).
    The prefetched tile stays in the input dtype until used, so that no conversion waits on it.
    """
    run_max, run_norm, run_dot = initial_stats(ACC_FP64)
    if PREFETCH:
        x_raw, u_raw = load_raw(
            x_row_ptr,
            u_row_ptr,
            x_stride_v,
            u_stride_v,
            first_chunk,
            tl.where(first_chunk < end_chunk, vocab, 0),
            BLOCK,
            X_CONTIG,
            U_CONTIG,
            True,
        )
        for chunk in range(first_chunk, end_chunk):
            next_x, next_u = load_raw(
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                chunk + 1,
                tl.where(chunk + 1 < end_chunk, vocab, 0),
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                True,
            )
            x, u = to_acc(x_raw, u_raw, ACC_FP64)
            run_max, run_norm, run_dot = merge_tile(run_max, run_norm, run_dot, x, u)
            x_raw, u_raw = next_x, next_u
    else:
        for chunk in range(first_chunk, end_chunk):
            x, u = load_tile(
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                chunk,
                vocab,
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                ACC_FP64,
                True,
            )
            run_max, run_norm, run_dot = merge_tile(run_max, run_norm, run_dot, x, u)
    return run_max, run_norm, run_dot


@triton.jit
def write_segment(
    x_row_ptr,
    u_row_ptr,
    out_row_ptr,
    x_stride_v,
    u_stride_v,
    out_stride_v,
    first_chunk,
    end_chunk,
    vocab,
    row_max,
    coef,
    prob_dot_u,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Output chunks [first_chunk, end_chunk) of a row, last chunk first (re-read from L2).

    out = exp(x - row_max) * coef * (u - prob_dot_u) with coef = scale / norm. ``PREFETCH`` as in
    ``segment_stats`` (the chunk below is loaded while the current one is written).
    """
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    if PREFETCH:
        x_raw, u_raw = load_raw(
            x_row_ptr,
            u_row_ptr,
            x_stride_v,
            u_stride_v,
            tl.maximum(end_chunk - 1, first_chunk),
            tl.where(first_chunk < end_chunk, vocab, 0),
            BLOCK,
            X_CONTIG,
            U_CONTIG,
            False,
        )
        for step in range(0, end_chunk - first_chunk):
            chunk = end_chunk - 1 - step
            # Offsets stay >= 0 (a masked load past the row start would still form addresses).
            next_x, next_u = load_raw(
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                tl.maximum(chunk - 1, first_chunk),
                tl.where(chunk - 1 >= first_chunk, vocab, 0),
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                False,
            )
            x, u = to_acc(x_raw, u_raw, ACC_FP64)
            result = tl.exp(x - safe_max) * coef * (u - prob_dot_u)
            store_tile(out_row_ptr, out_stride_v, chunk, vocab, result, BLOCK, OUT_CONTIG)
            x_raw, u_raw = next_x, next_u
    else:
        for step in range(0, end_chunk - first_chunk):
            chunk = end_chunk - 1 - step
            x, u = load_tile(
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                chunk,
                vocab,
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                ACC_FP64,
                False,
            )
            result = tl.exp(x - safe_max) * coef * (u - prob_dot_u)
            store_tile(out_row_ptr, out_stride_v, chunk, vocab, result, BLOCK, OUT_CONTIG)


@triton.jit
def zero_segment(
    out_row_ptr,
    out_stride_v,
    first_chunk,
    end_chunk,
    vocab,
    BLOCK: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
):
    """Exact zeros over chunks [first_chunk, end_chunk) of a row without a target."""
    zeros = tl.zeros([BLOCK], dtype=tl.float32)
    for chunk in range(first_chunk, end_chunk):
        store_tile(out_row_ptr, out_stride_v, chunk, vocab, zeros, BLOCK, OUT_CONTIG)


@triton.jit(do_not_specialize=["seq_len", "num_rows", "num_chunks"])
def _two_pass_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    labels_ptr,
    scale_ptr,
    seq_len,
    num_rows,
    vocab,
    num_chunks,
    x_stride_b,
    x_stride_t,
    x_stride_v,
    u_stride_b,
    u_stride_t,
    u_stride_v,
    out_stride_b,
    out_stride_t,
    out_stride_v,
    labels_stride_b,
    labels_stride_t,
    ignore_index,
    scale_value,
    HAS_LABELS: tl.constexpr,
    SHIFT: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    if SCALE_IN_MEMORY:
        scale = tl.load(scale_ptr)
    else:
        scale = scale_value
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        batch_index, position, has_target = locate_row(
            row,
            seq_len,
            labels_ptr,
            labels_stride_b,
            labels_stride_t,
            ignore_index,
            HAS_LABELS,
            SHIFT,
        )
        out_row_ptr = out_ptr + batch_index * out_stride_b + position * out_stride_t
        if has_target:
            x_row_ptr = x_ptr + batch_index * x_stride_b + position * x_stride_t
            u_row_ptr = u_ptr + batch_index * u_stride_b + position * u_stride_t
            row_max, row_norm, row_dot = segment_stats(
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                0,
                num_chunks,
                vocab,
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                ACC_FP64,
                PREFETCH,
            )
            write_segment(
                x_row_ptr,
                u_row_ptr,
                out_row_ptr,
                x_stride_v,
                u_stride_v,
                out_stride_v,
                0,
                num_chunks,
                vocab,
                row_max,
                scale / row_norm,
                row_dot / row_norm,
                BLOCK,
                X_CONTIG,
                U_CONTIG,
                OUT_CONTIG,
                ACC_FP64,
                PREFETCH,
            )
        else:
            zero_segment(out_row_ptr, out_stride_v, 0, num_chunks, vocab, BLOCK, OUT_CONTIG)


# ----------------------------------------------------------------------------------------------
# Host side: config, persistent-grid sizing, launcher, autotuning.


@dataclass(frozen=True)
class TwoPassConfig:
    """Knobs of one launch.

    block: entries of a row per chunk (a power of two); num_warps: Triton's. (No num_stages: Triton
        does not software-pipeline these loops' loads, whatever num_stages says; checked in PTX.)
    programs_per_sm: resident programs per SM wanted (capped by the compiled kernel's occupancy).
    prefetch: the loops over chunks load the next chunk before reducing the current one.
    """

    block: int
    num_warps: int
    programs_per_sm: int = 1
    prefetch: bool = False

    def label(self) -> str:
        parts = [f"{self.block}x{self.num_warps}"]
        if self.programs_per_sm != 1:
            parts.append(f"pps{self.programs_per_sm}")
        if self.prefetch:
            parts.append("pf")
        return "/".join(parts)


# Resident programs per SM found per compiled kernel, and why a query failed (benchmarks read them).
_occupancy: dict[tuple, int] = {}
_occupancy_errors: dict[tuple, str] = {}
_occupancy_lock = threading.Lock()


def _device_limits(device: torch.device) -> tuple[int, int, int, int]:
    """(SMs, registers per SM, threads per SM, shared memory bytes per SM)."""
    props = torch.cuda.get_device_properties(device)
    return (
        props.multi_processor_count,
        getattr(props, "regs_per_multiprocessor", 65536),
        getattr(props, "max_threads_per_multi_processor", 2048),
        getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
    )


def resident_programs(
    regs_per_thread: int,
    shared_bytes: int,
    num_warps: int,
    *,
    regs_per_sm: int,
    threads_per_sm: int,
    shared_per_sm: int,
) -> int:
    """Programs of a kernel that fit on one SM at once (at least 1).

    Registers are allocated per warp in units of 256; each program's shared memory comes with
    1 KB reserved by the driver; at most 32 programs per SM.
    """
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared_bytes + 1024) if shared_bytes else 32
    return max(1, min(by_regs, by_threads, by_shared, 32))


def _programs_per_sm(kernel, args: tuple, kwargs: dict, num_warps: int, device) -> int:
    """Resident programs per SM of a compiled kernel (registers, threads and shared memory).

    Compiles the kernel (``warmup``) if needed; cached per kernel and constexprs. A kernel whose
    metadata cannot be read counts as one program per SM (safe for the waiting kernels).
    """
    key = (
        kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel),
        device.index,
        num_warps,
        tuple(sorted(kwargs.items())),
        tuple(getattr(a, "dtype", type(a)) for a in args),
    )
    with _occupancy_lock:
        if key in _occupancy:
            return _occupancy[key]
        try:
            compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **kwargs)
            compiled._init_handles()
            _, regs_per_sm, threads_per_sm, shared_per_sm = _device_limits(device)
            resident = resident_programs(
                int(compiled.n_regs),
                int(compiled.metadata.shared),
                num_warps,
                regs_per_sm=regs_per_sm,
                threads_per_sm=threads_per_sm,
                shared_per_sm=shared_per_sm,
            )
        except Exception as error:  # metadata layout differs between Triton versions
            _occupancy_errors[key] = f"{type(error).__name__}: {error}"[:300]
            resident = 1
        _occupancy[key] = resident
        return resident


def persistent_programs(
    kernel,
    args: tuple,
    kwargs: dict,
    *,
    num_warps: int,
    programs_per_sm: int,
    device: torch.device,
) -> int:
    """Programs that can be resident at once (interpreter: a small number, so loops iterate)."""
    if is_interpreter():
        return 3
    resident = _programs_per_sm(kernel, args, kwargs, num_warps, device)
    sms = _device_limits(device)[0]
    return sms * max(1, min(programs_per_sm, resident))


def launch(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: TwoPassConfig,
) -> None:
    """One launch with a given config (no tuning); tensors as for ``ce_hvp_two_pass``."""
    batch, seq_len, vocab = logits.shape
    num_rows = batch * seq_len
    common = launch_arguments(
        logits, u, labels, out, ignore_index=ignore_index, shift=shift, scale=scale
    )
    num_chunks = triton.cdiv(vocab, config.block)
    args = (*common.pointers, seq_len, num_rows, vocab, num_chunks, *common.scalars)
    kwargs = dict(**common.constexprs, BLOCK=config.block, PREFETCH=config.prefetch)
    programs = persistent_programs(
        _two_pass_kernel,
        args,
        kwargs,
        num_warps=config.num_warps,
        programs_per_sm=config.programs_per_sm,
        device=logits.device,
    )
    grid = (max(1, min(num_rows, programs)),)
    _two_pass_kernel[grid](*args, num_warps=config.num_warps, **kwargs)


def whole_row_config(vocab: int, programs_per_sm: int) -> TwoPassConfig:
    """One chunk per row (rows of at most 4096 entries), 8 to 16 entries per thread."""
    block = triton.next_power_of_2(vocab)
    return TwoPassConfig(block, max(1, min(8, block // 512)), programs_per_sm=programs_per_sm)


def candidate_configs(vocab: int) -> list[TwoPassConfig]:
    """The configs the autotuner times for this vocabulary size.

    Elements per thread stay at 8 to 16 per tensor: at 32, ptxas needs 100 to 255 registers and
    spills (checked with ptxas for sm_90).
    """
    if vocab <= 4096:
        return [whole_row_config(vocab, programs_per_sm=4)]
    # the winners of the H200 sweep (docs/benchmarks/ce_hvp.md): 4096x8 at 4 programs per SM
    # for bf16, 8192x16 with prefetch for fp32; the rest came within 10% of them
    return [
        TwoPassConfig(4096, 8, programs_per_sm=4),
        TwoPassConfig(8192, 16, programs_per_sm=1, prefetch=True),
        TwoPassConfig(4096, 8, programs_per_sm=2, prefetch=True),
        TwoPassConfig(16384, 16, programs_per_sm=1),
    ]


_PREFERRED = TwoPassConfig(4096, 8, programs_per_sm=4)


def default_config(vocab: int) -> TwoPassConfig:
    """Config used without tuning (interpreter, or TORCH_LINOP_CE_HVP_AUTOTUNE=0)."""
    options = candidate_configs(vocab)
    return _PREFERRED if _PREFERRED in options else options[0]


# Picked config and every candidate's median ms per tuning key (benchmarks/ce_hvp_tuning.py reads
# them for its reports).
_tuned: dict[tuple, TwoPassConfig] = {}
_tuning_timings: dict[tuple, dict[TwoPassConfig, float]] = {}


def tune(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    candidates: list[TwoPassConfig] | None = None,
    tune_rows: int | None = None,
    failed: dict[TwoPassConfig, str] | None = None,
) -> tuple[TwoPassConfig, dict[TwoPassConfig, float]]:
    """Time every candidate (median ms; see ``time_configs``); return the fastest and all times."""
    if candidates is None:
        candidates = candidate_configs(logits.shape[-1])

    run = functools.partial(launch, ignore_index=ignore_index, shift=shift, scale=scale)
    return fastest_config(
        run,
        candidates,
        logits,
        u,
        labels,
        out,
        tune_rows=tune_rows,
        kernel_name="two-pass kernel",
        failed=failed,
    )


def ce_hvp_two_pass(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: TwoPassConfig | None = None,
) -> torch.Tensor:
    """Write the product into ``out``; all of logits, u, out are (B, T, V), labels (B, T) or None.

    ``out`` may be ``u`` itself (in place). ``config=None`` autotunes once per (device, V, dtypes)
    on the leading rows (about 512 MB of logits), unless running in the interpreter or
    TORCH_LINOP_CE_HVP_AUTOTUNE=0.
    """
    if out.numel() == 0:
        return out
    vocab = logits.shape[-1]
    if config is None:
        tune_rows = max(2048, (1 << 29) // (vocab * logits.element_size()))
        config = pick_config(
            (logits.device.index, vocab, logits.dtype, u.dtype, out.dtype),
            _tuned,
            _tuning_timings,
            lambda: default_config(vocab),
            lambda: tune(
                logits,
                u,
                labels,
                out,
                ignore_index=ignore_index,
                shift=shift,
                scale=scale,
                tune_rows=tune_rows,
            ),
        )
    launch(
        logits,
        u,
        labels,
        out,
        ignore_index=ignore_index,
        shift=shift,
        scale=scale,
        config=config,
    )
    return out
