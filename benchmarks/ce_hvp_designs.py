"""Triton designs for the cross-entropy Hessian-vector product compared by the benchmark.

Not shipped: ``benchmarks/ce_hvp_variants.py`` times these against the shipped kernels, and
``tests/kernels/test_ce_hvp_variants.py`` checks them against float64 oracles. Each launcher has
the signature of ``benchmarks.ce_hvp_split.ce_hvp_split`` (logits, u, out: (B, T, V);
labels: (B, T) or None; ``out`` may alias ``u``) and computes, per row r with a target and
p = softmax(x_r), ``out_r = scale * (p * u_r - p * <p, u_r>)``; other rows are exact zeros.

Why these designs: the first (split-row) kernel holds its chunk of a row in registers while the
row's programs exchange partial results, so the bytes in flight per SM are capped by the register
file and divided by the length of the load -> publish -> poll -> store chain. The designs below
hold the data in L2 instead (50 MB on an H100/H200, more than the registers of all SMs):

- ``two_pass``: the shipped kernel (``torch_linop.kernels._ce_hvp_two_pass``), listed here so
  that one run compares every design: persistent programs, one row at a time, pass 1 streaming
  the row for its online-softmax numbers, pass 2 re-reading it in reverse from L2.
- ``two_pass_lanes``: the shipped kernel with another pass 1. The shipped pass 1 reduces every
  chunk across the block three times (max, then the sums of exps and of exps * u), and with one
  16-warp program per SM (its best configs) those barrier-bound chains serialise the SM. Here
  each lane keeps its own running (max, norm, dot) through the row (one exp per entry, no
  cross-lane work in the loop) and the block reduces them once per row.
- ``split_coop``: persistent groups of G programs; each program owns a contiguous segment of a
  row, streams it once for its partial (max, norm, dot), exchanges them with its G - 1 siblings
  through a global buffer, then re-reads its (short, hence L2-resident) segment in reverse and
  writes it. A segment of one chunk is kept in registers instead (the split-row design, made
  persistent). The exchange is the split kernel's (bounded spin, then claim late siblings'
  segments), so it never deadlocks, even when siblings are not resident.
- ``split_two_kernel``: no inter-program waiting at all: per block of rows small enough for L2,
  a stats kernel writes every segment's partial numbers and an output kernel merges them and
  writes the block (re-reading it from L2). Costs two launches per row block.
- ``current_sweep``: the split-row kernel with a wider (chunk, warps) sweep.

Persistent grids are sized from the compiled kernel's occupancy (registers, threads, shared
memory), so the programs of a split row are resident together. Every design accumulates in
float32 (float64 for float64 inputs), handles labels, the causal shift and ignore_index inside
the kernel and addresses all tensors through their strides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from benchmarks.ce_hvp_split import (
    KernelConfig,
    ce_hvp_split,
    poll_published,
    publish_stats,
)
from benchmarks.ce_hvp_tuning import occupancy_report
from torch_linop.kernels import _ce_hvp_two_pass as two_pass
from torch_linop.kernels._ce_hvp_common import (
    LaunchArguments,
    fastest_config,
    is_interpreter,
    launch_arguments,
    load_raw,
    load_tile,
    locate_row,
    pick_config,
    to_acc,
)
from torch_linop.kernels._ce_hvp_two_pass import (
    initial_stats,
    merge_tile,
    persistent_programs,
    segment_stats,
    store_tile,
    write_segment,
    zero_segment,
)

__all__ = [
    "VARIANTS",
    "VariantConfig",
    "candidate_configs",
    "ce_hvp_current_sweep",
    "ce_hvp_split_coop",
    "ce_hvp_split_two_kernel",
    "ce_hvp_two_pass",
    "ce_hvp_two_pass_lanes",
    "default_config",
    "occupancy_report",
    "tune",
    "tuned_configs",
    "tuning_timings",
]

# Polls of a row's published count before a program claims its late siblings' segments (a few
# ms of L2 round trips: resident siblings publish within microseconds, and a claim is only
# wasted traffic, so a short budget bounds the cost of a sibling that is not resident);
# tests lower it to force the claim path on the GPU.
_POLLS_BEFORE_CLAIMING = 1 << 12
# Stat slots read per row by one vector load (masked to the G in use): a constant, so that the
# compiled kernel does not depend on the vocabulary size.
_MIN_SLOTS = 64

# Integer arguments that vary between problems without changing the code worth compiling (Triton
# would otherwise specialise them on divisibility by 16 and recompile per vocabulary size).
_VARYING_INTS = ("seq_len", "num_rows", "num_chunks", "group_size", "seg_chunks", "row_start")


def _jit(fn):
    """``triton.jit`` that does not specialise the kernel on ``_VARYING_INTS``."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in _VARYING_INTS if name in names])


# ----------------------------------------------------------------------------------------------
# Device side. The row location, tile loads, online-softmax merge and the two-pass kernel's
# segment loops come from the package (kernels/_ce_hvp_common.py, kernels/_ce_hvp_two_pass.py).


@triton.jit
def _merge_slots(stats_ptr, first_slot, num_slots, SLOTS: tl.constexpr):
    """Merge ``num_slots`` published (max, norm, dot) triples into the row's numbers.

    Not the split kernel's merge (``_row_stats``): the max is shifted to 0 when it is -inf.
    """
    slots = tl.arange(0, SLOTS)
    has_slot = slots < num_slots
    slot_ptrs = stats_ptr + (first_slot + slots) * 3
    maxes = tl.load(slot_ptrs, mask=has_slot, other=-float("inf"), volatile=True)
    norms = tl.load(slot_ptrs + 1, mask=has_slot, other=0.0, volatile=True)
    dots = tl.load(slot_ptrs + 2, mask=has_slot, other=0.0, volatile=True)
    row_max = tl.max(maxes, 0)
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    weights = tl.exp(maxes - safe_max)
    return row_max, tl.sum(norms * weights, 0), tl.sum(dots * weights, 0)


# ----------------------------------------------------------------------------------------------
# split_coop: G programs per row, each owning a contiguous segment of ``seg_chunks`` chunks.


@triton.jit
def _row_numbers(
    row,
    group_size,
    seg_chunks,
    num_chunks,
    claim_ptr,
    count_ptr,
    stats_ptr,
    x_row_ptr,
    u_row_ptr,
    x_stride_v,
    u_stride_v,
    vocab,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    """Wait until the row's G segments are published and merge them (row max, norm, dot).

    After ``MAX_SPIN`` polls the program claims every segment nobody has claimed yet (a
    compare-and-swap per segment, so each is published exactly once), computes it from memory and
    publishes it. Owners write their output only after all segments are published, so a claimer
    never reads a segment that was already overwritten (in-place mode stays correct).
    """
    first_slot = row * group_size
    published = poll_published(count_ptr, row, group_size, MAX_SPIN)
    if published < group_size:
        for other in range(0, group_size):
            if tl.atomic_cas(claim_ptr + first_slot + other, 0, 1) == 0:
                other_first = other * seg_chunks
                other_max, other_norm, other_dot = segment_stats(
                    x_row_ptr,
                    u_row_ptr,
                    x_stride_v,
                    u_stride_v,
                    other_first,
                    tl.minimum(other_first + seg_chunks, num_chunks),
                    vocab,
                    BLOCK,
                    X_CONTIG,
                    U_CONTIG,
                    ACC_FP64,
                    False,
                )
                publish_stats(
                    stats_ptr,
                    count_ptr,
                    row,
                    first_slot + other,
                    other_max,
                    other_norm,
                    other_dot,
                )
        # Every segment is now claimed by a running program that publishes without waiting.
        while published < group_size:
            published = tl.load(count_ptr + row, volatile=True)
    tl.atomic_add(count_ptr + row, 0, sem="acquire")
    return _merge_slots(stats_ptr, first_slot, group_size, SLOTS)


@_jit
def _split_coop_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    labels_ptr,
    scale_ptr,
    claim_ptr,
    count_ptr,
    stats_ptr,
    seq_len,
    num_rows,
    vocab,
    num_chunks,
    group_size,
    seg_chunks,
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
    SLOTS: tl.constexpr,
    ONE_TILE: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    """Program ``g * G + s`` owns segment s of rows g, g + groups, g + 2 groups, ...

    The G programs of a group always work on the same row, so a group only ever waits on itself.
    ``ONE_TILE``: a segment is one chunk, kept in registers through the exchange (single read).
    """
    program = tl.program_id(0)
    group = program // group_size
    segment = program % group_size
    num_groups = tl.num_programs(0) // group_size
    first_chunk = segment * seg_chunks
    end_chunk = tl.minimum(first_chunk + seg_chunks, num_chunks)
    if SCALE_IN_MEMORY:
        scale = tl.load(scale_ptr)
    else:
        scale = scale_value
    for row in range(group, num_rows, num_groups):
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
            row64 = tl.zeros((), dtype=tl.int64) + row
            x_row_ptr = x_ptr + batch_index * x_stride_b + position * x_stride_t
            u_row_ptr = u_ptr + batch_index * u_stride_b + position * u_stride_t
            # Claim the own segment first: the atomic's latency hides behind the loads.
            was_claimed = tl.atomic_cas(claim_ptr + row64 * group_size + segment, 0, 1)
            if ONE_TILE:
                x, u = load_tile(
                    x_row_ptr,
                    u_row_ptr,
                    x_stride_v,
                    u_stride_v,
                    first_chunk,
                    vocab,
                    BLOCK,
                    X_CONTIG,
                    U_CONTIG,
                    ACC_FP64,
                    False,
                )
                own_max, own_norm, own_dot = initial_stats(ACC_FP64)
                own_max, own_norm, own_dot = merge_tile(own_max, own_norm, own_dot, x, u)
            else:
                own_max, own_norm, own_dot = segment_stats(
                    x_row_ptr,
                    u_row_ptr,
                    x_stride_v,
                    u_stride_v,
                    first_chunk,
                    end_chunk,
                    vocab,
                    BLOCK,
                    X_CONTIG,
                    U_CONTIG,
                    ACC_FP64,
                    PREFETCH,
                )
            if was_claimed == 0:
                publish_stats(
                    stats_ptr,
                    count_ptr,
                    row64,
                    row64 * group_size + segment,
                    own_max,
                    own_norm,
                    own_dot,
                )
            row_max, row_norm, row_dot = _row_numbers(
                row64,
                group_size,
                seg_chunks,
                num_chunks,
                claim_ptr,
                count_ptr,
                stats_ptr,
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                vocab,
                BLOCK,
                SLOTS,
                X_CONTIG,
                U_CONTIG,
                ACC_FP64,
                MAX_SPIN,
            )
            if ONE_TILE:
                safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
                result = tl.exp(x - safe_max) * (scale / row_norm) * (u - row_dot / row_norm)
                store_tile(out_row_ptr, out_stride_v, first_chunk, vocab, result, BLOCK, OUT_CONTIG)
            else:
                write_segment(
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
            zero_segment(
                out_row_ptr, out_stride_v, first_chunk, end_chunk, vocab, BLOCK, OUT_CONTIG
            )


@_jit
def _block_stats_kernel(
    x_ptr,
    u_ptr,
    labels_ptr,
    stats_ptr,
    row_start,
    seq_len,
    vocab,
    num_chunks,
    group_size,
    seg_chunks,
    x_stride_b,
    x_stride_t,
    x_stride_v,
    u_stride_b,
    u_stride_t,
    u_stride_v,
    labels_stride_b,
    labels_stride_t,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Grid (rows of the block, G): partial (max, norm, dot) of one segment of one row."""
    local_row = tl.program_id(0)
    segment = tl.program_id(1)
    batch_index, position, has_target = locate_row(
        row_start + local_row,
        seq_len,
        labels_ptr,
        labels_stride_b,
        labels_stride_t,
        ignore_index,
        HAS_LABELS,
        SHIFT,
    )
    if has_target:
        first_chunk = segment * seg_chunks
        seg_max, seg_norm, seg_dot = segment_stats(
            x_ptr + batch_index * x_stride_b + position * x_stride_t,
            u_ptr + batch_index * u_stride_b + position * u_stride_t,
            x_stride_v,
            u_stride_v,
            first_chunk,
            tl.minimum(first_chunk + seg_chunks, num_chunks),
            vocab,
            BLOCK,
            X_CONTIG,
            U_CONTIG,
            ACC_FP64,
            PREFETCH,
        )
        slot_ptr = stats_ptr + (local_row * group_size + segment) * 3
        tl.store(slot_ptr, seg_max)
        tl.store(slot_ptr + 1, seg_norm)
        tl.store(slot_ptr + 2, seg_dot)


@_jit
def _block_output_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    labels_ptr,
    scale_ptr,
    stats_ptr,
    row_start,
    seq_len,
    vocab,
    num_chunks,
    group_size,
    seg_chunks,
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
    SLOTS: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Grid (rows of the block, G): merge the row's G partials and write one segment."""
    local_row = tl.program_id(0)
    segment = tl.program_id(1)
    batch_index, position, has_target = locate_row(
        row_start + local_row,
        seq_len,
        labels_ptr,
        labels_stride_b,
        labels_stride_t,
        ignore_index,
        HAS_LABELS,
        SHIFT,
    )
    first_chunk = segment * seg_chunks
    end_chunk = tl.minimum(first_chunk + seg_chunks, num_chunks)
    out_row_ptr = out_ptr + batch_index * out_stride_b + position * out_stride_t
    if has_target:
        if SCALE_IN_MEMORY:
            scale = tl.load(scale_ptr)
        else:
            scale = scale_value
        row_max, row_norm, row_dot = _merge_slots(
            stats_ptr, local_row * group_size, group_size, SLOTS
        )
        write_segment(
            x_ptr + batch_index * x_stride_b + position * x_stride_t,
            u_ptr + batch_index * u_stride_b + position * u_stride_t,
            out_row_ptr,
            x_stride_v,
            u_stride_v,
            out_stride_v,
            first_chunk,
            end_chunk,
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
        zero_segment(out_row_ptr, out_stride_v, first_chunk, end_chunk, vocab, BLOCK, OUT_CONTIG)


# ----------------------------------------------------------------------------------------------
# two_pass_lanes: the shipped two-pass kernel with a pass 1 that reduces across lanes once a row.


@triton.jit
def _empty_lanes(BLOCK: tl.constexpr, ACC_FP64: tl.constexpr):
    """Per-lane (max, norm, dot) of an empty set: (lowest finite value, 0, 0).

    A finite start keeps ``x - max`` free of -inf - (-inf) for masked and -inf logits, and
    (lowest, 0, 0) stands for an empty set at any max, so a logit equal to it still counts.
    """
    if ACC_FP64:
        lowest = tl.full([BLOCK], -1.7976931348623157e308, tl.float64)
    else:
        lowest = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
    zeros = tl.zeros_like(lowest)
    return lowest, zeros, zeros


@triton.jit
def _merge_lanes(lane_max, lane_norm, lane_dot, x, u):
    """Each lane's online-softmax update with its new entry: one exp, no cross-lane work.

    With e = exp(-|x - max|): a larger x rescales the lane's sums by e and adds (1, u), otherwise
    (e, e u) is added; e <= 1 never overflows and is 0 for x = -inf (masked lanes add nothing).
    """
    gap = tl.exp(-tl.abs(x - lane_max))
    grow = x > lane_max
    keep = tl.where(grow, gap, 1.0)  # factor on the lane's sums so far
    add = tl.where(grow, 1.0, gap)  # weight of the new entry
    return tl.where(grow, x, lane_max), lane_norm * keep + add, lane_dot * keep + add * u


@triton.jit
def _reduce_lanes(lane_max, lane_norm, lane_dot):
    """The row's (max, norm, dot) from the per-lane ones: the only cross-lane reductions.

    The row max is exact (a logit), so pass 2 recomputes the same probabilities. Lanes that saw
    no finite logit sit at the lowest finite value with zero sums and drop out.
    """
    row_max = tl.max(lane_max, 0)
    weights = tl.exp(lane_max - row_max)
    return row_max, tl.sum(lane_norm * weights, 0), tl.sum(lane_dot * weights, 0)


@triton.jit
def _lane_stats(
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
    """(max, norm, dot) of chunks [first_chunk, end_chunk) of a row: ``segment_stats`` with
    per-lane running numbers, reduced across the block once at the end instead of per chunk.

    ``PREFETCH`` as in ``segment_stats``: the next chunk's loads are issued before the current
    chunk is used (two chunks in flight), and the prefetched tile stays in the input dtype.
    """
    lane_max, lane_norm, lane_dot = _empty_lanes(BLOCK, ACC_FP64)
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
            lane_max, lane_norm, lane_dot = _merge_lanes(lane_max, lane_norm, lane_dot, x, u)
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
            lane_max, lane_norm, lane_dot = _merge_lanes(lane_max, lane_norm, lane_dot, x, u)
    return _reduce_lanes(lane_max, lane_norm, lane_dot)


@_jit
def _two_pass_lanes_kernel(
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
    """The shipped two-pass kernel (persistent programs, one row at a time, pass 2 in reverse
    from L2) with ``_lane_stats`` as pass 1."""
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
            row_max, row_norm, row_dot = _lane_stats(
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
# Host side: configs, occupancy, launchers, tuning.


@dataclass(frozen=True)
class VariantConfig:
    """Knobs of one variant's launch.

    block: entries of a row per chunk (a power of two); num_warps: Triton's. (No num_stages: Triton
        does not software-pipeline these loops' loads, whatever num_stages says; checked in PTX.)
    seg_chunks: chunks per program segment (split variants; G = cdiv(chunks, seg_chunks)).
    programs_per_sm: resident programs per SM wanted by the persistent variants (capped by the
        compiled kernel's occupancy).
    block_mb: megabytes of x + u per row block of ``split_two_kernel`` (should fit in L2).
    prefetch: loops over chunks load the next chunk before reducing the current one.
    """

    block: int
    num_warps: int
    seg_chunks: int = 1
    programs_per_sm: int = 1
    block_mb: int = 0
    prefetch: bool = False

    def label(self) -> str:
        parts = [f"{self.block}x{self.num_warps}"]
        if self.seg_chunks != 1:
            parts.append(f"seg{self.seg_chunks}")
        if self.programs_per_sm != 1:
            parts.append(f"pps{self.programs_per_sm}")
        if self.block_mb:
            parts.append(f"{self.block_mb}MB")
        if self.prefetch:
            parts.append("pf")
        return "/".join(parts)


@dataclass(frozen=True)
class _Problem:
    """Everything a launch needs besides the config (tensors are (B, T, V) views)."""

    logits: torch.Tensor
    u: torch.Tensor
    labels: torch.Tensor | None
    out: torch.Tensor
    ignore_index: int
    shift: bool
    scale: torch.Tensor | float

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1]

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0] * self.logits.shape[1]

    def arguments(self) -> LaunchArguments:
        """The arguments every kernel takes in the same form (as the shipped launchers build)."""
        return launch_arguments(
            self.logits,
            self.u,
            self.labels,
            self.out,
            ignore_index=self.ignore_index,
            shift=self.shift,
            scale=self.scale,
        )


def _group_size(vocab: int, config: VariantConfig) -> int:
    return triton.cdiv(triton.cdiv(vocab, config.block), config.seg_chunks)


def _slots(group_size: int) -> int:
    return max(_MIN_SLOTS, triton.next_power_of_2(group_size))


def _split_coop_launch(problem: _Problem, config: VariantConfig) -> None:
    logits = problem.logits
    device = logits.device
    common = problem.arguments()
    num_rows, vocab = problem.num_rows, problem.vocab
    num_chunks = triton.cdiv(vocab, config.block)
    group_size = _group_size(vocab, config)
    # One zeroed allocation holds the per-segment claims and the per-row published counts.
    sync = torch.zeros(num_rows * group_size + num_rows, dtype=torch.int32, device=device)
    claim, count = sync[: num_rows * group_size], sync[num_rows * group_size :]
    stats = torch.empty(num_rows * group_size * 3, dtype=common.acc_dtype, device=device)
    args = (
        *common.pointers,
        claim,
        count,
        stats,
        logits.shape[1],
        num_rows,
        vocab,
        num_chunks,
        group_size,
        config.seg_chunks,
        *common.scalars,
    )
    kwargs = dict(
        **common.constexprs,
        BLOCK=config.block,
        SLOTS=_slots(group_size),
        ONE_TILE=config.seg_chunks == 1,
        MAX_SPIN=0 if is_interpreter() else _POLLS_BEFORE_CLAIMING,
        PREFETCH=config.prefetch and config.seg_chunks > 1,
    )
    programs = persistent_programs(
        _split_coop_kernel,
        args,
        kwargs,
        num_warps=config.num_warps,
        programs_per_sm=config.programs_per_sm,
        device=device,
    )
    num_groups = max(1, min(num_rows, programs // group_size))
    _split_coop_kernel[(num_groups * group_size,)](*args, num_warps=config.num_warps, **kwargs)


def _block_rows(problem: _Problem, config: VariantConfig) -> int:
    """Rows per block of ``split_two_kernel``: x + u of the block take about ``block_mb`` MB."""
    if is_interpreter():
        return 2  # several blocks even on tiny inputs
    row_bytes = problem.vocab * (problem.logits.element_size() + problem.u.element_size())
    return max(1, (config.block_mb << 20) // row_bytes)


def _split_two_kernel_launch(problem: _Problem, config: VariantConfig) -> None:
    logits, u = problem.logits, problem.u
    common = problem.arguments()
    num_rows, vocab = problem.num_rows, problem.vocab
    num_chunks = triton.cdiv(vocab, config.block)
    group_size = _group_size(vocab, config)
    rows_per_block = min(num_rows, _block_rows(problem, config))
    stats = torch.empty(rows_per_block * group_size * 3, dtype=common.acc_dtype, device=u.device)
    shared = (logits.shape[1], vocab, num_chunks, group_size, config.seg_chunks)
    # the stats kernel reads neither out nor the scale
    stats_constexprs = {
        name: common.constexprs[name]
        for name in ("HAS_LABELS", "SHIFT", "X_CONTIG", "U_CONTIG", "ACC_FP64")
    }
    for row_start in range(0, num_rows, rows_per_block):
        grid = (min(rows_per_block, num_rows - row_start), group_size)
        _block_stats_kernel[grid](
            logits,
            u,
            common.labels,
            stats,
            row_start,
            *shared,
            *logits.stride(),
            *u.stride(),
            *common.labels_strides,
            common.ignore_index,
            **stats_constexprs,
            BLOCK=config.block,
            PREFETCH=config.prefetch,
            num_warps=config.num_warps,
        )
        _block_output_kernel[grid](
            *common.pointers,
            stats,
            row_start,
            *shared,
            *common.scalars,
            **common.constexprs,
            BLOCK=config.block,
            SLOTS=_slots(group_size),
            PREFETCH=config.prefetch,
            num_warps=config.num_warps,
        )


def _two_pass_launch(problem: _Problem, config: VariantConfig) -> None:
    """The shipped two-pass kernel (``seg_chunks`` and ``block_mb`` do not apply to it)."""
    two_pass.launch(
        problem.logits,
        problem.u,
        problem.labels,
        problem.out,
        ignore_index=problem.ignore_index,
        shift=problem.shift,
        scale=problem.scale,
        config=two_pass.TwoPassConfig(
            config.block, config.num_warps, config.programs_per_sm, config.prefetch
        ),
    )


def _two_pass_lanes_launch(problem: _Problem, config: VariantConfig) -> None:
    """The per-lane pass-1 kernel, launched as the shipped two-pass kernel is (persistent grid
    sized from the compiled kernel's occupancy; ``seg_chunks`` and ``block_mb`` do not apply)."""
    logits = problem.logits
    common = problem.arguments()
    num_chunks = triton.cdiv(problem.vocab, config.block)
    args = (
        *common.pointers,
        logits.shape[1],
        problem.num_rows,
        problem.vocab,
        num_chunks,
        *common.scalars,
    )
    kwargs = dict(**common.constexprs, BLOCK=config.block, PREFETCH=config.prefetch)
    programs = persistent_programs(
        _two_pass_lanes_kernel,
        args,
        kwargs,
        num_warps=config.num_warps,
        programs_per_sm=config.programs_per_sm,
        device=logits.device,
    )
    grid = (max(1, min(problem.num_rows, programs)),)
    _two_pass_lanes_kernel[grid](*args, num_warps=config.num_warps, **kwargs)


def _current_launch(problem: _Problem, config: VariantConfig) -> None:
    """The split-row kernel with a given (chunk, warps) config."""
    ce_hvp_split(
        problem.logits,
        problem.u,
        problem.labels,
        problem.out,
        ignore_index=problem.ignore_index,
        shift=problem.shift,
        scale=problem.scale,
        config=KernelConfig(config.block, config.num_warps),
    )


def _as_variant_config(config: two_pass.TwoPassConfig) -> VariantConfig:
    return VariantConfig(
        config.block,
        config.num_warps,
        programs_per_sm=config.programs_per_sm,
        prefetch=config.prefetch,
    )


# Candidate lists: few enough that compiling all of them for two dtypes stays within a minute.
# Elements per thread stay at 8 to 16 per tensor: at 32, ptxas needs 100 to 255 registers and
# spills (checked with ptxas for sm_90).
def _small_vocab(vocab: int, programs_per_sm: int = 1, block_mb: int = 0) -> list[VariantConfig]:
    """One chunk per row when the whole row fits a chunk of at most 4096 entries."""
    whole_row = two_pass.whole_row_config(vocab, programs_per_sm)
    return [replace(_as_variant_config(whole_row), block_mb=block_mb)]


def _two_pass_candidates(vocab: int) -> list[VariantConfig]:
    """The shipped autotuner's list (kernels/_ce_hvp_two_pass.py)."""
    return [_as_variant_config(config) for config in two_pass.candidate_configs(vocab)]


def _two_pass_lanes_candidates(vocab: int) -> list[VariantConfig]:
    """The shipped kernel's winners plus shapes its per-chunk reductions penalised: one 16-warp
    program per SM with 8192-entry chunks, and more, smaller programs per SM."""
    if vocab <= 4096:
        return _small_vocab(vocab, programs_per_sm=4)
    return [
        VariantConfig(8192, 16, programs_per_sm=1),
        VariantConfig(8192, 16, programs_per_sm=1, prefetch=True),
        VariantConfig(4096, 8, programs_per_sm=2),
        VariantConfig(4096, 8, programs_per_sm=2, prefetch=True),
        VariantConfig(4096, 8, programs_per_sm=4),
        VariantConfig(16384, 16, programs_per_sm=4),  # capped by occupancy (registers)
        VariantConfig(2048, 4, programs_per_sm=4),
    ]


def _split_coop_candidates(vocab: int) -> list[VariantConfig]:
    if vocab <= 4096:
        return _small_vocab(vocab, programs_per_sm=4)
    candidates = [
        # Segments re-read from L2; working set = resident programs x segment length.
        VariantConfig(2048, 4, seg_chunks=2, programs_per_sm=4, prefetch=True),
        VariantConfig(2048, 4, seg_chunks=4, programs_per_sm=4),
        VariantConfig(2048, 4, seg_chunks=4, programs_per_sm=4, prefetch=True),
        VariantConfig(4096, 8, seg_chunks=2, programs_per_sm=2),
        VariantConfig(4096, 8, seg_chunks=2, programs_per_sm=4),
        VariantConfig(4096, 8, seg_chunks=2, programs_per_sm=2, prefetch=True),
        VariantConfig(4096, 8, seg_chunks=4, programs_per_sm=2),
        # One chunk per program, kept in registers: the split-row design, made persistent.
        VariantConfig(4096, 8, seg_chunks=1, programs_per_sm=4),
        VariantConfig(8192, 16, seg_chunks=1, programs_per_sm=2),
    ]
    return [c for c in candidates if c.block * c.seg_chunks < vocab or c.seg_chunks == 1]


def _split_two_kernel_candidates(vocab: int) -> list[VariantConfig]:
    if vocab <= 4096:
        return _small_vocab(vocab, block_mb=24)
    return [
        VariantConfig(4096, 8, seg_chunks=2, block_mb=24),
        VariantConfig(4096, 8, seg_chunks=2, block_mb=40),
        VariantConfig(4096, 8, seg_chunks=2, block_mb=24, prefetch=True),
        VariantConfig(2048, 4, seg_chunks=4, block_mb=32),
    ]


def _current_sweep_candidates(vocab: int) -> list[VariantConfig]:
    """Configs the split kernel's tuner does not time (it times 2048x4, 4096x4, 4096x8, 8192x8,
    8192x16 and 16384x16, its default; see docs/benchmarks/ce_hvp.md): 8 or 16 entries per
    thread, plus 16384x16 for reference."""
    whole_row = triton.next_power_of_2(vocab)
    if whole_row <= 4096:
        warps = [w for w in (1, 2, 4, 8) if whole_row >= 64 * w] or [1]
        return [VariantConfig(whole_row, w) for w in warps]
    pairs = [(1024, 4), (2048, 8), (4096, 16), (16384, 16), (16384, 32)]
    return [VariantConfig(block, warps) for block, warps in pairs if block < vocab]


@dataclass(frozen=True)
class _Variant:
    launch: Callable[[_Problem, VariantConfig], None]
    candidates: Callable[[int], list[VariantConfig]]
    default: Callable[[int], VariantConfig]


def _preferring(candidates: Callable[[int], list[VariantConfig]], preferred: VariantConfig):
    """Default config: ``preferred`` when it is a candidate for V, else the first candidate."""

    def pick(vocab: int) -> VariantConfig:
        options = candidates(vocab)
        return preferred if preferred in options else options[0]

    return pick


_VARIANTS: dict[str, _Variant] = {
    "two_pass": _Variant(
        _two_pass_launch,
        _two_pass_candidates,
        lambda vocab: _as_variant_config(two_pass.default_config(vocab)),
    ),
    "two_pass_lanes": _Variant(
        _two_pass_lanes_launch,
        _two_pass_lanes_candidates,
        _preferring(
            _two_pass_lanes_candidates, VariantConfig(8192, 16, programs_per_sm=1, prefetch=True)
        ),
    ),
    "split_coop": _Variant(
        _split_coop_launch,
        _split_coop_candidates,
        _preferring(
            _split_coop_candidates, VariantConfig(4096, 8, seg_chunks=2, programs_per_sm=2)
        ),
    ),
    "split_two_kernel": _Variant(
        _split_two_kernel_launch,
        _split_two_kernel_candidates,
        _preferring(
            _split_two_kernel_candidates, VariantConfig(4096, 8, seg_chunks=2, block_mb=40)
        ),
    ),
    "current_sweep": _Variant(
        _current_launch,
        _current_sweep_candidates,
        _preferring(_current_sweep_candidates, VariantConfig(16384, 16)),
    ),
}

_tuned: dict[tuple, VariantConfig] = {}
_tuning_timings: dict[tuple, dict[VariantConfig, float]] = {}


def candidate_configs(variant: str, vocab: int) -> list[VariantConfig]:
    """The configs the autotuner times for this variant and vocabulary size."""
    return _VARIANTS[variant].candidates(vocab)


def default_config(variant: str, vocab: int) -> VariantConfig:
    """Config used without tuning (interpreter, or TORCH_LINOP_CE_HVP_AUTOTUNE=0)."""
    return _VARIANTS[variant].default(vocab)


def tuned_configs() -> dict[tuple, VariantConfig]:
    """Best config per (variant, device, V, dtypes), as picked so far."""
    return dict(_tuned)


def tuning_timings() -> dict[tuple, dict[VariantConfig, float]]:
    """Median ms of every candidate timed so far, per tuning key."""
    return {key: dict(timings) for key, timings in _tuning_timings.items()}


def tune(
    variant: str,
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    candidates: list[VariantConfig] | None = None,
    tune_rows: int | None = None,
    failed: dict[VariantConfig, str] | None = None,
) -> tuple[VariantConfig, dict[VariantConfig, float]]:
    """Time every candidate (median ms) and return the fastest with all timings.

    ``tune_rows``, ``failed`` and where it writes: as ``time_configs`` of the package.
    """
    if candidates is None:
        candidates = candidate_configs(variant, logits.shape[-1])
    launch = _VARIANTS[variant].launch

    def run(logits, u, labels, out, config: VariantConfig) -> None:
        launch(_Problem(logits, u, labels, out, ignore_index, shift, scale), config)

    return fastest_config(
        run,
        candidates,
        logits,
        u,
        labels,
        out,
        tune_rows=tune_rows,
        kernel_name=f"variant {variant!r}",
        failed=failed,
    )


def _run_variant(
    variant: str,
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: VariantConfig | None,
) -> torch.Tensor:
    if out.numel() == 0:
        return out
    vocab = logits.shape[-1]
    if config is None:
        tune_rows = max(2048, (1 << 29) // (vocab * logits.element_size()))
        config = pick_config(
            (variant, logits.device.index, vocab, logits.dtype, u.dtype, out.dtype),
            _tuned,
            _tuning_timings,
            lambda: default_config(variant, vocab),
            lambda: tune(
                variant,
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
    problem = _Problem(logits, u, labels, out, ignore_index, shift, scale)
    _VARIANTS[variant].launch(problem, config)
    return out


def _launcher(variant: str, doc: str):
    def launcher(
        logits: torch.Tensor,
        u: torch.Tensor,
        labels: torch.Tensor | None,
        out: torch.Tensor,
        *,
        ignore_index: int,
        shift: bool,
        scale: torch.Tensor | float,
        config: VariantConfig | None = None,
    ) -> torch.Tensor:
        return _run_variant(
            variant,
            logits,
            u,
            labels,
            out,
            ignore_index=ignore_index,
            shift=shift,
            scale=scale,
            config=config,
        )

    launcher.__name__ = launcher.__qualname__ = f"ce_hvp_{variant}"
    launcher.__doc__ = (
        f"{doc}\n\nSame contract as ``ce_hvp_split``: writes into ``out`` (may be ``u``) and "
        "returns it; ``config=None`` autotunes once per (device, V, dtypes) unless in the "
        "interpreter or TORCH_LINOP_CE_HVP_AUTOTUNE=0."
    )
    return launcher


ce_hvp_two_pass = _launcher(
    "two_pass", "The shipped persistent two-pass kernel (reverse second pass)."
)
ce_hvp_two_pass_lanes = _launcher(
    "two_pass_lanes",
    "The two-pass kernel with per-lane pass-1 numbers, reduced across lanes once per row.",
)
ce_hvp_split_coop = _launcher(
    "split_coop", "Persistent split-row kernel: G programs per row exchange partial results."
)
ce_hvp_split_two_kernel = _launcher(
    "split_two_kernel", "Stats kernel then output kernel per L2-sized block of rows."
)
ce_hvp_current_sweep = _launcher(
    "current_sweep", "The split-row kernel with a wider (chunk, warps) sweep."
)

VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "two_pass": ce_hvp_two_pass,
    "two_pass_lanes": ce_hvp_two_pass_lanes,
    "split_coop": ce_hvp_split_coop,
    "split_two_kernel": ce_hvp_split_two_kernel,
    "current_sweep": ce_hvp_current_sweep,
}
