"""Alternative Triton designs for the cross-entropy Hessian-vector product (benchmark candidates).

Each launcher has the signature of ``_ce_hvp_triton.ce_hvp_triton`` (logits, u, out: (B, T, V);
labels: (B, T) or None; ``out`` may alias ``u``) and computes, per row r with a target and
p = softmax(x_r), ``out_r = scale * (p * u_r - p * <p, u_r>)``; other rows are exact zeros.
``benchmarks/ce_hvp_variants.py`` times them against the current kernel on the GPU.

Why these designs: the current kernel holds its chunk of a row in registers while the row's
programs exchange partial results, so the bytes in flight per SM are capped by the register file
and divided by the length of the load -> publish -> poll -> store chain. The variants below hold
the data in L2 instead (50 MB on an H100/H200, more than the registers of all SMs):

- ``two_pass``: persistent programs, one row at a time. Pass 1 streams the row computing the
  online-softmax max, normaliser and <p, u> (loads marked ``evict_last``); pass 2 walks the chunks
  in reverse (the most recent are the likeliest still in L2) and writes the output.
- ``split_coop``: persistent groups of G programs; each program owns a contiguous segment of a
  row, streams it once for its partial (max, norm, dot), exchanges them with its G - 1 siblings
  through a global buffer, then re-reads its (short, hence L2-resident) segment in reverse and
  writes it. A segment of one chunk is kept in registers instead (the current design, made
  persistent). The exchange is the current kernel's (bounded spin, then claim late siblings'
  segments), so it never deadlocks, even when siblings are not resident.
- ``split_two_kernel``: no inter-program waiting at all: per block of rows small enough for L2,
  a stats kernel writes every segment's partial numbers and an output kernel merges them and
  writes the block (re-reading it from L2). Costs two launches per row block.
- ``current_sweep``: the current kernel with a wider (chunk, warps) sweep.

Triton does not software-pipeline the loads of these loops (no cp.async in the PTX, whatever
``num_stages`` says), so a program has one chunk in flight unless ``prefetch`` is on: then it
issues the next chunk's loads before reducing the current one (two chunks in flight, more
registers). Persistent grids are sized from the compiled kernel's occupancy (registers, threads,
shared memory), so the programs of a split row are resident together.

Every variant accumulates in float32 (float64 for float64 inputs), handles labels, the causal
shift and ignore_index inside the kernel and addresses all tensors through their strides.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

from ._ce_hvp_triton import KernelConfig, _publish, ce_hvp_triton, is_interpreter

__all__ = [
    "VARIANTS",
    "VariantConfig",
    "candidate_configs",
    "ce_hvp_current_sweep",
    "ce_hvp_split_coop",
    "ce_hvp_split_two_kernel",
    "ce_hvp_two_pass",
    "default_config",
    "occupancy_report",
    "resident_programs",
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
# Building blocks shared by the kernels.


@triton.jit
def _locate_row(
    row,
    seq_len,
    labels_ptr,
    labels_stride_b,
    labels_stride_t,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """(batch index, position, has a target) of a flattened row; the label decides the last."""
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
def _load_raw(
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
def _to_acc(x, u, ACC_FP64: tl.constexpr):
    """Cast a raw tile to the accumulation type (a no-op for float32 inputs)."""
    if ACC_FP64:
        return x.to(tl.float64), u.to(tl.float64)
    return x.to(tl.float32), u.to(tl.float32)


@triton.jit
def _load_tile(
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
    """``_load_raw`` of a whole chunk, in the accumulation type."""
    x, u = _load_raw(
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
    return _to_acc(x, u, ACC_FP64)


@triton.jit
def _store_tile(
    out_row_ptr, out_stride_v, chunk, vocab, values, BLOCK: tl.constexpr, OUT_CONTIG: tl.constexpr
):
    """Write one chunk of an output row (values cast to the output dtype)."""
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
def _initial_stats(ACC_FP64: tl.constexpr):
    """(max, norm, dot) of an empty set: (-inf, 0, 0) in the accumulation type."""
    if ACC_FP64:
        zero = tl.zeros((), dtype=tl.float64)
    else:
        zero = tl.zeros((), dtype=tl.float32)
    return zero - float("inf"), zero, zero


@triton.jit
def _merge_tile(run_max, run_norm, run_dot, x, u):
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
def _segment_stats(
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
    run_max, run_norm, run_dot = _initial_stats(ACC_FP64)
    if PREFETCH:
        x_raw, u_raw = _load_raw(
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
            next_x, next_u = _load_raw(
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
            x, u = _to_acc(x_raw, u_raw, ACC_FP64)
            run_max, run_norm, run_dot = _merge_tile(run_max, run_norm, run_dot, x, u)
            x_raw, u_raw = next_x, next_u
    else:
        for chunk in range(first_chunk, end_chunk):
            x, u = _load_tile(
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
            run_max, run_norm, run_dot = _merge_tile(run_max, run_norm, run_dot, x, u)
    return run_max, run_norm, run_dot


@triton.jit
def _write_segment(
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
    ``_segment_stats`` (the chunk below is loaded while the current one is written).
    """
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    if PREFETCH:
        x_raw, u_raw = _load_raw(
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
            next_x, next_u = _load_raw(
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
            x, u = _to_acc(x_raw, u_raw, ACC_FP64)
            result = tl.exp(x - safe_max) * coef * (u - prob_dot_u)
            _store_tile(out_row_ptr, out_stride_v, chunk, vocab, result, BLOCK, OUT_CONTIG)
            x_raw, u_raw = next_x, next_u
    else:
        for step in range(0, end_chunk - first_chunk):
            chunk = end_chunk - 1 - step
            x, u = _load_tile(
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
            _store_tile(out_row_ptr, out_stride_v, chunk, vocab, result, BLOCK, OUT_CONTIG)


@triton.jit
def _zero_segment(
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
        _store_tile(out_row_ptr, out_stride_v, chunk, vocab, zeros, BLOCK, OUT_CONTIG)


@triton.jit
def _merge_slots(stats_ptr, first_slot, num_slots, SLOTS: tl.constexpr):
    """Merge ``num_slots`` published (max, norm, dot) triples into the row's numbers."""
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
# (a) two passes per row, persistent programs.


@_jit
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
        batch_index, position, has_target = _locate_row(
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
            row_max, row_norm, row_dot = _segment_stats(
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
            _write_segment(
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
            _zero_segment(out_row_ptr, out_stride_v, 0, num_chunks, vocab, BLOCK, OUT_CONTIG)


# ----------------------------------------------------------------------------------------------
# (b) split rows: G programs per row, each owning a contiguous segment of ``seg_chunks`` chunks.


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
    published = tl.load(count_ptr + row, volatile=True)
    polls = 0
    while (published < group_size) & (polls < MAX_SPIN):
        published = tl.load(count_ptr + row, volatile=True)
        polls += 1
    if published < group_size:
        for other in range(0, group_size):
            if tl.atomic_cas(claim_ptr + first_slot + other, 0, 1) == 0:
                other_first = other * seg_chunks
                other_max, other_norm, other_dot = _segment_stats(
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
                _publish(
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
        batch_index, position, has_target = _locate_row(
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
                x, u = _load_tile(
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
                own_max, own_norm, own_dot = _initial_stats(ACC_FP64)
                own_max, own_norm, own_dot = _merge_tile(own_max, own_norm, own_dot, x, u)
            else:
                own_max, own_norm, own_dot = _segment_stats(
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
                _publish(
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
                _store_tile(
                    out_row_ptr, out_stride_v, first_chunk, vocab, result, BLOCK, OUT_CONTIG
                )
            else:
                _write_segment(
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
            _zero_segment(
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
    batch_index, position, has_target = _locate_row(
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
        seg_max, seg_norm, seg_dot = _segment_stats(
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
    batch_index, position, has_target = _locate_row(
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
        _write_segment(
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
        _zero_segment(out_row_ptr, out_stride_v, first_chunk, end_chunk, vocab, BLOCK, OUT_CONTIG)


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

    @property
    def acc_fp64(self) -> bool:
        return torch.float64 in (self.logits.dtype, self.u.dtype)

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.acc_fp64 else torch.float32

    def common_args(self) -> dict:
        """Scale (a device scalar, or a float passed by value), labels placeholder and strides."""
        device = self.logits.device
        scale_in_memory = isinstance(self.scale, torch.Tensor) or self.acc_fp64
        if isinstance(self.scale, torch.Tensor):
            scale_tensor = self.scale.to(self.acc_dtype)
        elif self.acc_fp64:  # a float argument would reach the kernel rounded to float32
            scale_tensor = torch.full((), float(self.scale), dtype=torch.float64, device=device)
        else:
            scale_tensor = torch.empty(1, dtype=self.acc_dtype, device=device)
        labels = self.labels
        labels_strides: tuple[int, ...]
        if labels is None:
            labels, labels_strides = torch.empty(1, dtype=torch.int64, device=device), (0, 0)
        else:
            labels_strides = labels.stride()
        return {
            "labels": labels,
            "labels_strides": labels_strides,
            "scale_tensor": scale_tensor,
            "scale_value": 1.0 if scale_in_memory else float(self.scale),
            "scale_in_memory": scale_in_memory,
        }

    def layout_constexprs(self) -> dict:
        return {
            "HAS_LABELS": self.labels is not None,
            "SHIFT": self.shift,
            "X_CONTIG": _is_inner_contiguous(self.logits),
            "U_CONTIG": _is_inner_contiguous(self.u),
            "ACC_FP64": self.acc_fp64,
        }


def _is_inner_contiguous(tensor: torch.Tensor) -> bool:
    return tensor.shape[-1] <= 1 or tensor.stride(-1) == 1


_occupancy: dict[tuple, int] = {}
_occupancy_errors: dict[tuple, str] = {}
_occupancy_lock = threading.Lock()


def occupancy_report() -> list[dict]:
    """Resident programs per SM found for each compiled persistent kernel (for benchmarks)."""
    return [
        {
            "kernel": key[0],
            "num_warps": key[2],
            "constexprs": dict(key[3]),
            "programs_per_sm": resident,
            "error": _occupancy_errors.get(key),
        }
        for key, resident in _occupancy.items()
    ]


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


def _persistent_programs(
    kernel, args: tuple, kwargs: dict, config: VariantConfig, device: torch.device
) -> int:
    """Programs that can be resident at once (interpreter: a small number, so loops iterate)."""
    if is_interpreter():
        return 3
    resident = _programs_per_sm(kernel, args, kwargs, config.num_warps, device)
    sms = _device_limits(device)[0]
    return sms * max(1, min(config.programs_per_sm, resident))


def _two_pass_launch(problem: _Problem, config: VariantConfig) -> None:
    logits, u, out = problem.logits, problem.u, problem.out
    common = problem.common_args()
    seq_len = logits.shape[1]
    num_chunks = triton.cdiv(problem.vocab, config.block)
    args = (
        logits,
        u,
        out,
        common["labels"],
        common["scale_tensor"],
        seq_len,
        problem.num_rows,
        problem.vocab,
        num_chunks,
        *logits.stride(),
        *u.stride(),
        *out.stride(),
        *common["labels_strides"],
        problem.ignore_index,
        common["scale_value"],
    )
    kwargs = dict(
        **problem.layout_constexprs(),
        SCALE_IN_MEMORY=common["scale_in_memory"],
        BLOCK=config.block,
        OUT_CONTIG=_is_inner_contiguous(out),
        PREFETCH=config.prefetch,
    )
    programs = _persistent_programs(_two_pass_kernel, args, kwargs, config, logits.device)
    grid = (max(1, min(problem.num_rows, programs)),)
    _two_pass_kernel[grid](*args, num_warps=config.num_warps, **kwargs)


def _group_size(vocab: int, config: VariantConfig) -> int:
    return triton.cdiv(triton.cdiv(vocab, config.block), config.seg_chunks)


def _slots(group_size: int) -> int:
    return max(_MIN_SLOTS, triton.next_power_of_2(group_size))


def _split_coop_launch(problem: _Problem, config: VariantConfig) -> None:
    logits, u, out = problem.logits, problem.u, problem.out
    device = logits.device
    common = problem.common_args()
    num_rows, vocab = problem.num_rows, problem.vocab
    num_chunks = triton.cdiv(vocab, config.block)
    group_size = _group_size(vocab, config)
    # One zeroed allocation holds the per-segment claims and the per-row published counts.
    sync = torch.zeros(num_rows * group_size + num_rows, dtype=torch.int32, device=device)
    claim, count = sync[: num_rows * group_size], sync[num_rows * group_size :]
    stats = torch.empty(num_rows * group_size * 3, dtype=problem.acc_dtype, device=device)
    args = (
        logits,
        u,
        out,
        common["labels"],
        common["scale_tensor"],
        claim,
        count,
        stats,
        logits.shape[1],
        num_rows,
        vocab,
        num_chunks,
        group_size,
        config.seg_chunks,
        *logits.stride(),
        *u.stride(),
        *out.stride(),
        *common["labels_strides"],
        problem.ignore_index,
        common["scale_value"],
    )
    kwargs = dict(
        **problem.layout_constexprs(),
        SCALE_IN_MEMORY=common["scale_in_memory"],
        BLOCK=config.block,
        SLOTS=_slots(group_size),
        ONE_TILE=config.seg_chunks == 1,
        OUT_CONTIG=_is_inner_contiguous(out),
        MAX_SPIN=0 if is_interpreter() else _POLLS_BEFORE_CLAIMING,
        PREFETCH=config.prefetch and config.seg_chunks > 1,
    )
    programs = _persistent_programs(_split_coop_kernel, args, kwargs, config, device)
    num_groups = max(1, min(num_rows, programs // group_size))
    _split_coop_kernel[(num_groups * group_size,)](*args, num_warps=config.num_warps, **kwargs)


def _block_rows(problem: _Problem, config: VariantConfig) -> int:
    """Rows per block of ``split_two_kernel``: x + u of the block take about ``block_mb`` MB."""
    if is_interpreter():
        return 2  # several blocks even on tiny inputs
    row_bytes = problem.vocab * (problem.logits.element_size() + problem.u.element_size())
    return max(1, (config.block_mb << 20) // row_bytes)


def _split_two_kernel_launch(problem: _Problem, config: VariantConfig) -> None:
    logits, u, out = problem.logits, problem.u, problem.out
    common = problem.common_args()
    num_rows, vocab = problem.num_rows, problem.vocab
    num_chunks = triton.cdiv(vocab, config.block)
    group_size = _group_size(vocab, config)
    rows_per_block = min(num_rows, _block_rows(problem, config))
    stats = torch.empty(rows_per_block * group_size * 3, dtype=problem.acc_dtype, device=u.device)
    layout = problem.layout_constexprs()
    shared = (logits.shape[1], vocab, num_chunks, group_size, config.seg_chunks)
    for row_start in range(0, num_rows, rows_per_block):
        grid = (min(rows_per_block, num_rows - row_start), group_size)
        _block_stats_kernel[grid](
            logits,
            u,
            common["labels"],
            stats,
            row_start,
            *shared,
            *logits.stride(),
            *u.stride(),
            *common["labels_strides"],
            problem.ignore_index,
            HAS_LABELS=layout["HAS_LABELS"],
            SHIFT=layout["SHIFT"],
            BLOCK=config.block,
            X_CONTIG=layout["X_CONTIG"],
            U_CONTIG=layout["U_CONTIG"],
            ACC_FP64=layout["ACC_FP64"],
            PREFETCH=config.prefetch,
            num_warps=config.num_warps,
        )
        _block_output_kernel[grid](
            logits,
            u,
            out,
            common["labels"],
            common["scale_tensor"],
            stats,
            row_start,
            *shared,
            *logits.stride(),
            *u.stride(),
            *out.stride(),
            *common["labels_strides"],
            problem.ignore_index,
            common["scale_value"],
            **layout,
            SCALE_IN_MEMORY=common["scale_in_memory"],
            BLOCK=config.block,
            SLOTS=_slots(group_size),
            OUT_CONTIG=_is_inner_contiguous(out),
            PREFETCH=config.prefetch,
            num_warps=config.num_warps,
        )


def _current_launch(problem: _Problem, config: VariantConfig) -> None:
    # The shipped launcher passes a float scale by value, which Triton rounds to float32: give
    # float64 problems the scale as a float64 device scalar instead.
    scale = problem.common_args()["scale_tensor"] if problem.acc_fp64 else problem.scale
    ce_hvp_triton(
        problem.logits,
        problem.u,
        problem.labels,
        problem.out,
        ignore_index=problem.ignore_index,
        shift=problem.shift,
        scale=scale,
        config=KernelConfig(config.block, config.num_warps),
    )


# Candidate lists: few enough that compiling all of them for two dtypes stays within a minute.
# Elements per thread stay at 8 to 16 per tensor: at 32, ptxas needs 100 to 255 registers and
# spills (checked with ptxas for sm_90).
def _small_vocab(vocab: int, programs_per_sm: int = 1, block_mb: int = 0) -> list[VariantConfig]:
    """One chunk per row when the whole row fits a chunk of at most 4096 entries."""
    block = triton.next_power_of_2(vocab)
    warps = max(1, min(8, block // 512))
    return [VariantConfig(block, warps, programs_per_sm=programs_per_sm, block_mb=block_mb)]


def _two_pass_candidates(vocab: int) -> list[VariantConfig]:
    if vocab <= 4096:
        return _small_vocab(vocab, programs_per_sm=4)
    # the winners of the H200 sweep (docs/benchmarks/ce_hvp.md): 4096x8 at 4 programs per SM
    # for bf16, 8192x16 with prefetch for fp32; the rest came within 10% of them
    return [
        VariantConfig(4096, 8, programs_per_sm=4),
        VariantConfig(8192, 16, programs_per_sm=1, prefetch=True),
        VariantConfig(4096, 8, programs_per_sm=2, prefetch=True),
        VariantConfig(16384, 16, programs_per_sm=1),
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
        # One chunk per program, kept in registers: the current design, made persistent.
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
    """Configs the shipped tuner does not time (it times 2048x4, 4096x4, 4096x8, 8192x8,
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
        _preferring(_two_pass_candidates, VariantConfig(4096, 8, programs_per_sm=4)),
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
_tune_lock = threading.Lock()


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


def _leading_rows(tensor: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """A view of about ``num_rows`` leading rows of a (B, T, ...) tensor (no copy)."""
    if tensor is None:
        return None
    batch, seq_len = tensor.shape[0], tensor.shape[1]
    if batch > 1:
        return tensor[: max(1, min(batch, num_rows // seq_len))]
    return tensor[:, : min(seq_len, num_rows)]


def _leading_view(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``_leading_rows`` of a tensor that is not None."""
    view = _leading_rows(tensor, num_rows)
    assert view is not None
    return view


def _median_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


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

    ``tune_rows``: time on about that many leading rows (``None``: all rows). Writes into
    ``out`` (or a scratch buffer when ``out`` aliases ``u``, so tuning never changes u). A
    candidate that fails to compile or run is skipped (its error goes into ``failed``).
    """
    if candidates is None:
        candidates = candidate_configs(variant, logits.shape[-1])
    if tune_rows is not None:
        labels = _leading_rows(labels, tune_rows)
        logits, u, out = (_leading_view(t, tune_rows) for t in (logits, u, out))
    if out.data_ptr() == u.data_ptr():
        out = torch.empty(u.shape, dtype=out.dtype, device=out.device)
    problem = _Problem(logits, u, labels, out, ignore_index, shift, scale)
    launch = _VARIANTS[variant].launch
    timings: dict[VariantConfig, float] = {}
    for config in candidates:

        def run(config: VariantConfig = config) -> None:
            launch(problem, config)

        try:
            timings[config] = _median_ms(run, logits.device)
        except Exception as error:  # e.g. out of registers or shared memory for this config
            if failed is not None:
                failed[config] = f"{type(error).__name__}: {error}"[:300]
    if not timings:
        raise RuntimeError(f"ce_hvp variant {variant!r}: no candidate config ran")
    return min(timings, key=timings.__getitem__), timings


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
        if is_interpreter() or os.environ.get("TORCH_LINOP_CE_HVP_AUTOTUNE", "1") == "0":
            config = default_config(variant, vocab)
        else:
            key = (variant, logits.device.index, vocab, logits.dtype, u.dtype, out.dtype)
            with _tune_lock:
                if key not in _tuned:
                    tune_rows = max(2048, (1 << 29) // (vocab * logits.element_size()))
                    _tuned[key], _tuning_timings[key] = tune(
                        variant,
                        logits,
                        u,
                        labels,
                        out,
                        ignore_index=ignore_index,
                        shift=shift,
                        scale=scale,
                        tune_rows=tune_rows,
                    )
                config = _tuned[key]
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
        f"{doc}\n\nSame contract as ``ce_hvp_triton``: writes into ``out`` (may be ``u``) and "
        "returns it; ``config=None`` autotunes once per (device, V, dtypes) unless in the "
        "interpreter or TORCH_LINOP_CE_HVP_AUTOTUNE=0."
    )
    return launcher


ce_hvp_two_pass = _launcher("two_pass", "Persistent two-pass kernel (reverse second pass).")
ce_hvp_split_coop = _launcher(
    "split_coop", "Persistent split-row kernel: G programs per row exchange partial results."
)
ce_hvp_split_two_kernel = _launcher(
    "split_two_kernel", "Stats kernel then output kernel per L2-sized block of rows."
)
ce_hvp_current_sweep = _launcher(
    "current_sweep", "The current kernel with a wider (chunk, warps) sweep."
)

VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "two_pass": ce_hvp_two_pass,
    "split_coop": ce_hvp_split_coop,
    "split_two_kernel": ce_hvp_split_two_kernel,
    "current_sweep": ce_hvp_current_sweep,
}
