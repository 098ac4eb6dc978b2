"""Triton kernel for the cross-entropy Hessian-vector product, and its launcher.

Per valid row r with p = softmax(x_r): out_r = scale * (p * u_r - p * <p, u_r>).

Layout of the work: a row of V logits is cut into ``num_chunks`` chunks of ``BLOCK`` entries and
each program owns one (row, chunk). A program loads its chunk of x and u once into registers and
reduces it to three numbers (chunk max m, sum of exp(x - m), sum of exp(x - m) * u). The programs
of one row swap these through a small global buffer, merge them into the row's softmax normaliser
and <p, u> (the online-softmax merge), and write their chunk of the output from registers. So x and
u are read exactly once and the output written once: the bandwidth floor's traffic.

Exchanging partial results between programs needs the row's programs to run at the same time.
CUDA starts blocks in index order, so siblings (consecutive indices) are resident together in
practice, but nothing guarantees it. The kernel therefore never waits without a bound: a program
that waits longer than ``MAX_SPIN`` polls claims the chunks no sibling has published yet, reads
them from memory itself and publishes their numbers. A claim is a compare-and-swap per chunk, so
every chunk is published exactly once, and a chunk's owner writes its output only after all
chunks are published, so a claimer never reads a chunk that was already overwritten (this keeps
the in-place mode, out aliasing u, correct). Under ``TRITON_INTERPRET=1`` programs run one after
another; ``MAX_SPIN`` is 0 there, so the first program of a row takes the claim path and the
others the normal one, and the CPU tests exercise both.

The causal shift and ignore_index are applied by index arithmetic on the labels inside the kernel;
all tensors are addressed through their strides (no contiguous or shifted copies).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

__all__ = [
    "KernelConfig",
    "ce_hvp_triton",
    "is_interpreter",
    "tuned_configs",
    "tuning_timings",
]

_POLLS_BEFORE_CLAIMING = (
    1 << 17
)  # about 0.1 s of L2 polls on an H100/H200; never reached in practice


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
):
    """One chunk of a row of x (masked lanes -inf) and u (masked lanes 0), in the input dtypes.

    Lanes at or past ``vocab_limit`` (the vocabulary size, or 0 to load nothing) are masked.
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
    x = tl.load(x_ptrs, mask=in_row, other=-float("inf"), eviction_policy="evict_first")
    u = tl.load(u_ptrs, mask=in_row, other=0.0, eviction_policy="evict_first")
    return x, u


@triton.jit
def _load_chunk(
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
):
    """One chunk of a row of x and u, in the accumulation type."""
    x, u = _load_raw(
        x_row_ptr, u_row_ptr, x_stride_v, u_stride_v, chunk, vocab, BLOCK, X_CONTIG, U_CONTIG
    )
    if ACC_FP64:
        x = x.to(tl.float64)
        u = u.to(tl.float64)
    else:
        x = x.to(tl.float32)
        u = u.to(tl.float32)
    return x, u


@triton.jit
def _chunk_stats(x, u):
    """Chunk max m, exp(x - m), sum exp(x - m), sum exp(x - m) * u.

    A chunk of -inf logits (a masked vocabulary slice) gives m = -inf and zero sums, so it drops
    out of the row's merge instead of turning it into NaN.
    """
    chunk_max = tl.max(x, 0)
    finite_max = tl.where(chunk_max == -float("inf"), 0.0, chunk_max)
    exps = tl.exp(x - finite_max)
    return chunk_max, exps, tl.sum(exps, 0), tl.sum(exps * u, 0)


@triton.jit
def _publish(stats_ptr, count_ptr, row, slot, chunk_max, chunk_norm, chunk_dot):
    """Store one chunk's three numbers, then count them as published (release)."""
    tl.store(stats_ptr + slot * 3, chunk_max)
    tl.store(stats_ptr + slot * 3 + 1, chunk_norm)
    tl.store(stats_ptr + slot * 3 + 2, chunk_dot)
    tl.debug_barrier()
    tl.atomic_add(count_ptr + row, 1, sem="release")


@triton.jit
def _row_stats(
    was_claimed,
    own_max,
    own_norm,
    own_dot,
    row,
    chunk,
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
    CHUNKS_POW2: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    """Row max, softmax normaliser and sum exp(x - max) * u, merged over the row's chunks.

    ``was_claimed`` is the old value of this chunk's claim flag (0: this program publishes it).
    """
    first_slot = row * num_chunks
    if was_claimed == 0:
        _publish(stats_ptr, count_ptr, row, first_slot + chunk, own_max, own_norm, own_dot)
    published = tl.load(count_ptr + row, volatile=True)
    polls = 0
    while (published < num_chunks) & (polls < MAX_SPIN):
        published = tl.load(count_ptr + row, volatile=True)
        polls += 1
    if published < num_chunks:
        # Siblings are late: compute every chunk nobody has claimed yet from memory.
        for other_chunk in range(0, num_chunks):
            other_claimed = tl.atomic_cas(claim_ptr + first_slot + other_chunk, 0, 1)
            if other_claimed == 0:
                x_other, u_other = _load_chunk(
                    x_row_ptr,
                    u_row_ptr,
                    x_stride_v,
                    u_stride_v,
                    other_chunk,
                    vocab,
                    BLOCK,
                    X_CONTIG,
                    U_CONTIG,
                    ACC_FP64,
                )
                other_max, _, other_norm, other_dot = _chunk_stats(x_other, u_other)
                _publish(
                    stats_ptr,
                    count_ptr,
                    row,
                    first_slot + other_chunk,
                    other_max,
                    other_norm,
                    other_dot,
                )
        # Every chunk is now claimed by a running program that publishes without waiting.
        while published < num_chunks:
            published = tl.load(count_ptr + row, volatile=True)
    tl.atomic_add(count_ptr + row, 0, sem="acquire")
    slots = tl.arange(0, CHUNKS_POW2)
    has_slot = slots < num_chunks
    slot_ptrs = stats_ptr + (first_slot + slots) * 3
    maxes = tl.load(slot_ptrs, mask=has_slot, other=-float("inf"), volatile=True)
    norms = tl.load(slot_ptrs + 1, mask=has_slot, other=0.0, volatile=True)
    dots = tl.load(slot_ptrs + 2, mask=has_slot, other=0.0, volatile=True)
    row_max = tl.max(maxes, 0)
    weights = tl.exp(maxes - row_max)
    return row_max, tl.sum(norms * weights, 0), tl.sum(dots * weights, 0)


@triton.jit
def _ce_hvp_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    labels_ptr,
    scale_ptr,
    claim_ptr,
    count_ptr,
    stats_ptr,
    seq_len,
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
    CHUNKS_POW2: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    ACC_FP64: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    program = tl.program_id(0)
    if CHUNKS_POW2 == 1:
        row = program.to(tl.int64)
        chunk = 0
    else:
        row = (program // num_chunks).to(tl.int64)
        chunk = program % num_chunks
    batch_index = row // seq_len
    position = row % seq_len

    if HAS_LABELS:
        if SHIFT:
            has_next = position + 1 < seq_len
            label = tl.load(
                labels_ptr + batch_index * labels_stride_b + (position + 1) * labels_stride_t,
                mask=has_next,
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

    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    in_row = offsets < vocab
    out_row_ptr = out_ptr + batch_index * out_stride_b + position * out_stride_t
    if OUT_CONTIG:
        out_ptrs = out_row_ptr + offsets
    else:
        out_ptrs = out_row_ptr + offsets.to(tl.int64) * out_stride_v

    if has_target:
        x_row_ptr = x_ptr + batch_index * x_stride_b + position * x_stride_t
        u_row_ptr = u_ptr + batch_index * u_stride_b + position * u_stride_t
        if CHUNKS_POW2 > 1:
            # Claim the own chunk first: the atomic's latency hides behind the loads below.
            was_claimed = tl.atomic_cas(claim_ptr + row * num_chunks + chunk, 0, 1)
        x, u = _load_chunk(
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
        )
        own_max, exps, own_norm, own_dot = _chunk_stats(x, u)
        if SCALE_IN_MEMORY:
            scale = tl.load(scale_ptr)
        else:
            scale = scale_value
        if CHUNKS_POW2 == 1:
            coef = scale / own_norm
            prob_dot_u = own_dot / own_norm
        else:
            row_max, row_norm, row_dot = _row_stats(
                was_claimed,
                own_max,
                own_norm,
                own_dot,
                row,
                chunk,
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
                CHUNKS_POW2,
                X_CONTIG,
                U_CONTIG,
                ACC_FP64,
                MAX_SPIN,
            )
            coef = tl.exp(own_max - row_max) * scale / row_norm
            prob_dot_u = row_dot / row_norm
        result = exps * coef * (u - prob_dot_u)
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        tl.store(out_ptrs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Persistent, software-pipelined variant (float32 accumulation). A fixed grid of programs, all
# resident at once, walks the (row, chunk) items; each program loads its next item while it
# waits for the current row's partial results, so the memory system stays busy during the
# exchange. The exchange needs no fences: a chunk's numbers travel in two 64-bit words, each of
# which says by itself whether it was written (the buffer starts at zero):
#   word A = bits(max) << 32 | bits(norm)   (norm >= 0 and stored as >= 1 ulp: low half != 0)
#   word B = bits(dot) << 32 | 1
# so a reader that sees both low halves non-zero has all three numbers, whatever the order in
# which the two writes arrived. (Only sign extension is relied on, never zero extension.)
# Claims work as in the kernel above.
_PADDING_SLOT_A = tl.constexpr(-36028797018963967)  # bits(-inf) << 32 | 1: merges to nothing
_PADDING_SLOT_B = tl.constexpr(1)  # bits(0.0) << 32 | 1


@triton.jit
def _publish_packed(stats_ptr, slot, chunk_max, chunk_norm, chunk_dot):
    """Write one chunk's (max, norm, dot) as two self-validating 64-bit words."""
    max_bits = chunk_max.to(tl.int32, bitcast=True).to(tl.int64)
    norm_bits = chunk_norm.to(tl.int32, bitcast=True).to(tl.int64)
    norm_bits = tl.where(norm_bits == 0, 1, norm_bits)  # +0.0 -> 1 ulp: still reads as written
    dot_bits = chunk_dot.to(tl.int32, bitcast=True).to(tl.int64)
    tl.atomic_xchg(stats_ptr + slot * 2, (max_bits << 32) | norm_bits, sem="relaxed")
    tl.atomic_xchg(stats_ptr + slot * 2 + 1, (dot_bits << 32) | 1, sem="relaxed")


@triton.jit
def _read_slots(stats_ptr, first_slot, num_chunks, CHUNKS_POW2: tl.constexpr):
    """Both words of every chunk of a row, and how many slots (padding included) are written."""
    slots = tl.arange(0, CHUNKS_POW2)
    has_slot = slots < num_chunks
    slot_ptrs = stats_ptr + (first_slot + slots) * 2
    words_a = tl.load(slot_ptrs, mask=has_slot, other=_PADDING_SLOT_A, volatile=True)
    words_b = tl.load(slot_ptrs + 1, mask=has_slot, other=_PADDING_SLOT_B, volatile=True)
    written = (words_a.to(tl.int32) != 0) & (words_b.to(tl.int32) == 1)
    return words_a, words_b, tl.sum(written.to(tl.int32), 0)


@triton.jit
def _row_stats_packed(
    row,
    num_chunks,
    claim_ptr,
    stats_ptr,
    x_row_ptr,
    u_row_ptr,
    x_stride_v,
    u_stride_v,
    vocab,
    BLOCK: tl.constexpr,
    CHUNKS_POW2: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    """Row max, normaliser and dot merged over the row's chunks (claims late chunks)."""
    first_slot = row * num_chunks
    words_a, words_b, written = _read_slots(stats_ptr, first_slot, num_chunks, CHUNKS_POW2)
    polls = 0
    while (written < CHUNKS_POW2) & (polls < MAX_SPIN):
        words_a, words_b, written = _read_slots(stats_ptr, first_slot, num_chunks, CHUNKS_POW2)
        polls += 1
    if written < CHUNKS_POW2:
        for other_chunk in range(0, num_chunks):
            other_claimed = tl.atomic_cas(claim_ptr + first_slot + other_chunk, 0, 1)
            if other_claimed == 0:
                x_other, u_other = _load_chunk(
                    x_row_ptr,
                    u_row_ptr,
                    x_stride_v,
                    u_stride_v,
                    other_chunk,
                    vocab,
                    BLOCK,
                    X_CONTIG,
                    U_CONTIG,
                    False,
                )
                other_max, _, other_norm, other_dot = _chunk_stats(x_other, u_other)
                _publish_packed(
                    stats_ptr, first_slot + other_chunk, other_max, other_norm, other_dot
                )
        while written < CHUNKS_POW2:
            words_a, words_b, written = _read_slots(stats_ptr, first_slot, num_chunks, CHUNKS_POW2)
    maxes = (words_a >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    norms = words_a.to(tl.int32).to(tl.float32, bitcast=True)
    dots = (words_b >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    row_max = tl.max(maxes, 0)
    weights = tl.exp(maxes - row_max)
    return row_max, tl.sum(norms * weights, 0), tl.sum(dots * weights, 0)


@triton.jit
def _locate(
    item,
    num_items,
    num_chunks,
    seq_len,
    labels_ptr,
    labels_stride_b,
    labels_stride_t,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """Row, chunk, (batch, position) of an item, whether it exists and whether its row counts."""
    row = (item // num_chunks).to(tl.int64)
    chunk = item % num_chunks
    batch_index = row // seq_len
    position = row % seq_len
    exists = item < num_items
    if HAS_LABELS:
        if SHIFT:
            label = tl.load(
                labels_ptr + batch_index * labels_stride_b + (position + 1) * labels_stride_t,
                mask=exists & (position + 1 < seq_len),
                other=ignore_index,
            )
        else:
            label = tl.load(
                labels_ptr + batch_index * labels_stride_b + position * labels_stride_t,
                mask=exists,
                other=ignore_index,
            )
        has_target = label != ignore_index
    else:
        if SHIFT:
            has_target = exists & (position + 1 < seq_len)
        else:
            has_target = exists
    return row, chunk, batch_index, position, exists, has_target


@triton.jit
def _ce_hvp_pipelined_kernel(
    x_ptr,
    u_ptr,
    out_ptr,
    labels_ptr,
    scale_ptr,
    claim_ptr,
    stats_ptr,
    seq_len,
    vocab,
    num_chunks,
    num_items,
    num_steps,
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
    CHUNKS_POW2: tl.constexpr,
    X_CONTIG: tl.constexpr,
    U_CONTIG: tl.constexpr,
    OUT_CONTIG: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):
    num_programs = tl.num_programs(0)
    if SCALE_IN_MEMORY:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_value
    lanes = tl.arange(0, BLOCK)

    # Prologue: load the first item, publish its numbers.
    item = tl.program_id(0)
    row, chunk, batch_index, position, exists, has_target = _locate(
        item,
        num_items,
        num_chunks,
        seq_len,
        labels_ptr,
        labels_stride_b,
        labels_stride_t,
        ignore_index,
        HAS_LABELS,
        SHIFT,
    )
    x_row_ptr = x_ptr + batch_index * x_stride_b + position * x_stride_t
    u_row_ptr = u_ptr + batch_index * u_stride_b + position * u_stride_t
    claimed = has_target.to(tl.int32)
    if has_target:
        claimed = tl.atomic_cas(claim_ptr + row * num_chunks + chunk, 0, 1)
    x, u = _load_raw(
        x_row_ptr,
        u_row_ptr,
        x_stride_v,
        u_stride_v,
        chunk,
        tl.where(has_target, vocab, 0),
        BLOCK,
        X_CONTIG,
        U_CONTIG,
    )
    own_max, exps, own_norm, own_dot = _chunk_stats(x.to(tl.float32), u.to(tl.float32))
    if has_target & (claimed == 0):
        _publish_packed(stats_ptr, row * num_chunks + chunk, own_max, own_norm, own_dot)

    for _ in range(0, num_steps):
        # Start loading the next item before waiting on the current row.
        next_item = item + num_programs
        next_row, next_chunk, next_batch, next_position, next_exists, next_has_target = _locate(
            next_item,
            num_items,
            num_chunks,
            seq_len,
            labels_ptr,
            labels_stride_b,
            labels_stride_t,
            ignore_index,
            HAS_LABELS,
            SHIFT,
        )
        next_x_row_ptr = x_ptr + next_batch * x_stride_b + next_position * x_stride_t
        next_u_row_ptr = u_ptr + next_batch * u_stride_b + next_position * u_stride_t
        next_claimed = next_has_target.to(tl.int32)
        if next_has_target:
            next_claimed = tl.atomic_cas(claim_ptr + next_row * num_chunks + next_chunk, 0, 1)
        next_x, next_u = _load_raw(
            next_x_row_ptr,
            next_u_row_ptr,
            x_stride_v,
            u_stride_v,
            next_chunk,
            tl.where(next_has_target, vocab, 0),
            BLOCK,
            X_CONTIG,
            U_CONTIG,
        )

        # Finish the current item.
        offsets = chunk * BLOCK + lanes
        out_row_ptr = out_ptr + batch_index * out_stride_b + position * out_stride_t
        if OUT_CONTIG:
            out_ptrs = out_row_ptr + offsets
        else:
            out_ptrs = out_row_ptr + offsets.to(tl.int64) * out_stride_v
        result = tl.zeros([BLOCK], dtype=tl.float32)
        if has_target:
            row_max, row_norm, row_dot = _row_stats_packed(
                row,
                num_chunks,
                claim_ptr,
                stats_ptr,
                x_row_ptr,
                u_row_ptr,
                x_stride_v,
                u_stride_v,
                vocab,
                BLOCK,
                CHUNKS_POW2,
                X_CONTIG,
                U_CONTIG,
                MAX_SPIN,
            )
            coef = tl.exp(own_max - row_max) * scale / row_norm
            result = exps * coef * (u.to(tl.float32) - row_dot / row_norm)
        tl.store(
            out_ptrs, result.to(out_ptr.dtype.element_ty), mask=offsets < tl.where(exists, vocab, 0)
        )

        # The next item becomes the current one.
        own_max, exps, own_norm, own_dot = _chunk_stats(
            next_x.to(tl.float32), next_u.to(tl.float32)
        )
        if next_has_target & (next_claimed == 0):
            _publish_packed(
                stats_ptr, next_row * num_chunks + next_chunk, own_max, own_norm, own_dot
            )
        item = next_item
        row = next_row
        chunk = next_chunk
        batch_index = next_batch
        position = next_position
        exists = next_exists
        has_target = next_has_target
        x_row_ptr = next_x_row_ptr
        u_row_ptr = next_u_row_ptr
        u = next_u


def is_interpreter() -> bool:
    """True when Triton was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
    return type(_ce_hvp_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class KernelConfig:
    """Chunk length (entries of a row per program), warps per program, and which kernel:
    one program per (row, chunk), or the persistent pipelined one (float32 accumulation only)."""

    block: int
    num_warps: int
    pipelined: bool = False


def _candidate_configs(vocab: int, acc_fp64: bool) -> list[KernelConfig]:
    """Configs worth timing for this vocabulary size (8 to 32 entries of x and u per thread)."""
    whole_row = triton.next_power_of_2(vocab)
    if whole_row <= 4096:
        warps = [w for w in (1, 2, 4, 8) if whole_row >= 64 * w] or [1]
        return [KernelConfig(whole_row, w) for w in warps]
    configs = [
        KernelConfig(block, warps) for block, warps in [(4096, 4), (16384, 16)] if block < vocab
    ]
    if not acc_fp64:
        pipelined = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
        configs += [KernelConfig(block, warps, True) for block, warps in pipelined if block < vocab]
    if whole_row <= 16384:
        configs.append(KernelConfig(whole_row, 16))
    return configs


def _default_config(vocab: int) -> KernelConfig:
    """Config used when tuning is off (interpreter, or TORCH_LINOP_CE_HVP_AUTOTUNE=0)."""
    whole_row = triton.next_power_of_2(vocab)
    if whole_row <= 4096:
        return KernelConfig(whole_row, max(1, min(8, whole_row // 256)))
    return KernelConfig(4096, 8, pipelined=True)


_tuned: dict[tuple, KernelConfig] = {}
_tuning_timings: dict[tuple, dict[KernelConfig, float]] = {}
_tune_lock = threading.Lock()


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configs picked so far by the autotuner, keyed by problem signature (for benchmarks)."""
    return dict(_tuned)


def tuning_timings() -> dict[tuple, dict[KernelConfig, float]]:
    """Median milliseconds of every candidate timed by the autotuner (on the leading rows)."""
    return {key: dict(timings) for key, timings in _tuning_timings.items()}


def _is_inner_contiguous(tensor: torch.Tensor) -> bool:
    return tensor.shape[-1] <= 1 or tensor.stride(-1) == 1


def _launch(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: KernelConfig,
) -> None:
    batch, seq_len, vocab = logits.shape
    num_rows = batch * seq_len
    num_chunks = triton.cdiv(vocab, config.block)
    acc_fp64 = torch.float64 in (logits.dtype, u.dtype)
    acc_dtype = torch.float64 if acc_fp64 else torch.float32
    device = logits.device
    if config.pipelined and num_chunks > 1 and not acc_fp64:
        _launch_pipelined(
            logits,
            u,
            labels,
            out,
            ignore_index=ignore_index,
            shift=shift,
            scale=scale,
            config=config,
        )
        return
    if num_chunks > 1:
        # One zeroed allocation holds the per-chunk claims and the per-row published counts.
        sync = torch.zeros(num_rows * num_chunks + num_rows, dtype=torch.int32, device=device)
        claim, count = sync[: num_rows * num_chunks], sync[num_rows * num_chunks :]
        stats = torch.empty(num_rows * num_chunks * 3, dtype=acc_dtype, device=device)
    else:
        claim = count = torch.empty(1, dtype=torch.int32, device=device)
        stats = torch.empty(1, dtype=acc_dtype, device=device)
    if isinstance(scale, torch.Tensor):
        scale_tensor, scale_value = scale.to(acc_dtype), 1.0
    else:
        scale_tensor, scale_value = torch.empty(1, dtype=acc_dtype, device=device), float(scale)
    labels_arg = labels if labels is not None else torch.empty(1, dtype=torch.int64, device=device)
    labels_strides = labels.stride() if labels is not None else (0, 0)
    grid = (num_rows * num_chunks,)
    _ce_hvp_kernel[grid](
        logits,
        u,
        out,
        labels_arg,
        scale_tensor,
        claim,
        count,
        stats,
        seq_len,
        vocab,
        num_chunks,
        *logits.stride(),
        *u.stride(),
        *out.stride(),
        *labels_strides,
        ignore_index,
        scale_value,
        HAS_LABELS=labels is not None,
        SHIFT=shift,
        SCALE_IN_MEMORY=isinstance(scale, torch.Tensor),
        BLOCK=config.block,
        CHUNKS_POW2=triton.next_power_of_2(num_chunks),
        X_CONTIG=_is_inner_contiguous(logits),
        U_CONTIG=_is_inner_contiguous(u),
        OUT_CONTIG=_is_inner_contiguous(out),
        ACC_FP64=acc_fp64,
        MAX_SPIN=0 if is_interpreter() else _POLLS_BEFORE_CLAIMING,
        num_warps=config.num_warps,
    )


# Resident programs per multiprocessor of each compiled pipelined kernel, read off its registers
# and shared memory after its first launch (which runs with one program per multiprocessor).
_programs_per_sm: dict[tuple, int] = {}


def _resident_programs_per_sm(compiled: object, num_warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel fit on one multiprocessor at once (at least 1)."""
    props = torch.cuda.get_device_properties(device)
    registers = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    shared_memory = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    n_regs = int(getattr(compiled, "n_regs", 0) or 0)
    metadata = getattr(compiled, "metadata", None)
    shared = int(getattr(metadata, "shared", 0) or 0)
    if n_regs <= 0:
        return 1
    registers_per_warp = -(-n_regs * 32 // 256) * 256  # allocated in units of 256 per warp
    fit = min(
        registers // (registers_per_warp * num_warps),
        threads // (32 * num_warps),
        shared_memory // (shared + 1024),  # the driver reserves 1 KB per block
        32,
    )
    return max(1, fit)


def _launch_pipelined(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: KernelConfig,
) -> None:
    batch, seq_len, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, config.block)
    num_items = batch * seq_len * num_chunks
    device = logits.device
    # Zeroed words: two per chunk for its numbers, then the claims (as int32).
    sync = torch.zeros(3 * num_items, dtype=torch.int64, device=device)
    stats, claim = sync[: 2 * num_items], sync[2 * num_items :].view(torch.int32)
    if isinstance(scale, torch.Tensor):
        scale_tensor, scale_value = scale.to(torch.float32), 1.0
    else:
        scale_tensor = torch.empty(1, dtype=torch.float32, device=device)
        scale_value = float(scale)
    labels_arg = labels if labels is not None else torch.empty(1, dtype=torch.int64, device=device)
    labels_strides = labels.stride() if labels is not None else (0, 0)
    constexprs = dict(
        HAS_LABELS=labels is not None,
        SHIFT=shift,
        SCALE_IN_MEMORY=isinstance(scale, torch.Tensor),
        BLOCK=config.block,
        CHUNKS_POW2=triton.next_power_of_2(num_chunks),
        X_CONTIG=_is_inner_contiguous(logits),
        U_CONTIG=_is_inner_contiguous(u),
        OUT_CONTIG=_is_inner_contiguous(out),
        MAX_SPIN=0 if is_interpreter() else _POLLS_BEFORE_CLAIMING,
    )
    if is_interpreter():
        capacity = 2 * num_chunks  # programs run one after another: any count is "resident"
    else:
        occupancy_key = (
            device.index,
            config,
            logits.dtype,
            u.dtype,
            out.dtype,
            *constexprs.items(),
        )
        per_sm = _programs_per_sm.get(occupancy_key, 1)
        capacity = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    # A multiple of num_chunks, so the programs of one row always work on the same step.
    num_programs = min(num_items, max(num_chunks, capacity - capacity % num_chunks))
    num_steps = triton.cdiv(num_items, num_programs)
    compiled = _ce_hvp_pipelined_kernel[(num_programs,)](
        logits,
        u,
        out,
        labels_arg,
        scale_tensor,
        claim,
        stats,
        seq_len,
        vocab,
        num_chunks,
        num_items,
        num_steps,
        *logits.stride(),
        *u.stride(),
        *out.stride(),
        *labels_strides,
        ignore_index,
        scale_value,
        num_warps=config.num_warps,
        **constexprs,
    )
    if not is_interpreter() and occupancy_key not in _programs_per_sm:
        _programs_per_sm[occupancy_key] = _resident_programs_per_sm(
            compiled, config.num_warps, device
        )


def _leading_rows(tensor: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """A view of about ``num_rows`` leading rows of a (B, T, ...) tensor (no copy)."""
    if tensor is None:
        return None
    batch, seq_len = tensor.shape[0], tensor.shape[1]
    if batch > 1:
        return tensor[: max(1, min(batch, num_rows // seq_len))]
    return tensor[:, : min(seq_len, num_rows)]


def _tune(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    timings: dict[KernelConfig, float],
) -> KernelConfig:
    """Time every candidate config on the leading rows (about 256 MB of logits) and keep the best.

    Writes into the leading rows of ``out`` (overwritten by the real launch afterwards), or into a
    temporary buffer when ``out`` aliases ``u`` (the in-place mode), so tuning never changes u.
    """
    vocab = logits.shape[-1]
    candidates = _candidate_configs(vocab, torch.float64 in (logits.dtype, u.dtype))
    if len(candidates) == 1:
        return candidates[0]
    tune_rows = max(256, (1 << 28) // (vocab * logits.element_size()))
    sub_logits = _leading_rows(logits, tune_rows)
    sub_u = _leading_rows(u, tune_rows)
    sub_labels = _leading_rows(labels, tune_rows)
    if out.data_ptr() == u.data_ptr():
        sub_out = torch.empty(sub_u.shape, dtype=out.dtype, device=out.device)
    else:
        sub_out = _leading_rows(out, tune_rows)
    for config in candidates:

        def run(config: KernelConfig = config) -> None:
            _launch(
                sub_logits,
                sub_u,
                sub_labels,
                sub_out,
                ignore_index=ignore_index,
                shift=shift,
                scale=scale,
                config=config,
            )

        try:
            timings[config] = triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median")
        except Exception:  # a config that does not compile here (e.g. too many registers)
            continue
    if not timings:
        raise RuntimeError(f"no ce_hvp Triton config compiled for vocab={vocab}")
    return min(timings, key=timings.__getitem__)


def ce_hvp_triton(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Write the product into ``out``; all of logits, u, out are (B, T, V), labels (B, T) or None.

    ``out`` may be ``u`` itself (in place). ``config=None`` autotunes once per problem signature
    (first call only), unless running in the interpreter or TORCH_LINOP_CE_HVP_AUTOTUNE=0.
    """
    if out.numel() == 0:
        return out
    vocab = logits.shape[-1]
    if config is None:
        if is_interpreter() or os.environ.get("TORCH_LINOP_CE_HVP_AUTOTUNE", "1") == "0":
            config = _default_config(vocab)
        else:
            key = (
                logits.device.index,
                vocab,
                logits.dtype,
                u.dtype,
                out.dtype,
                labels is not None,
                shift,
                _is_inner_contiguous(logits),
                _is_inner_contiguous(u),
                _is_inner_contiguous(out),
            )
            with _tune_lock:
                if key not in _tuned:
                    _tuning_timings[key] = {}
                    _tuned[key] = _tune(
                        logits,
                        u,
                        labels,
                        out,
                        ignore_index=ignore_index,
                        shift=shift,
                        scale=scale,
                        timings=_tuning_timings[key],
                    )
                config = _tuned[key]
    _launch(
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
