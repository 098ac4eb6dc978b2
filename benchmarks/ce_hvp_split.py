"""An unshipped design: the split-row Triton kernel for the cross-entropy HVP, and its launcher.

Per valid row r with p = softmax(x_r): out_r = scale * (p * u_r - p * <p, u_r>). It was the first
kernel ``ce_hvp`` shipped (later only for float64). It no longer ships: in every measured shape it
was slower than the two-pass kernel (H200: 60 / 39 / 47 / 65 % of the bandwidth floor against
80 / 65 / 60 / 66 %, docs/benchmarks/ce_hvp.md), which also computes float64, and it relies on
sibling programs being resident at once. ``benchmarks/ce_hvp_designs.py`` builds the
``split_coop`` and ``current_sweep`` designs on it; ``tests/kernels/test_ce_hvp_variants.py``
(marker ``designs``) checks it against float64 oracles, its claim path included.

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

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torch_linop.kernels._ce_hvp_common import (
    fastest_config,
    is_inner_contiguous,
    is_interpreter,
    launch_arguments,
    load_tile,
    locate_row,
    pick_config,
)

__all__ = [
    "KernelConfig",
    "ce_hvp_split",
    "poll_published",
    "publish_stats",
    "tuned_configs",
    "tuning_timings",
]

# Polls of the row counter before a program claims its late siblings' chunks (about 0.1 s of L2
# round trips on an H100/H200); the tests lower it to force the claim path.
_POLLS_BEFORE_CLAIMING = 1 << 17


@triton.jit
def _chunk_stats(x, u):
    """Chunk max m, exp(x - m), sum exp(x - m), sum exp(x - m) * u.

    A chunk of -inf logits (a masked slice of the vocabulary) gives m = -inf and zero sums, so it
    drops out of the row's merge instead of turning it into NaN. Not the two-pass kernel's
    ``merge_tile``: no running max to rescale, and the exponentials stay in registers (output).
    """
    chunk_max = tl.max(x, 0)
    finite_max = tl.where(chunk_max == -float("inf"), 0.0, chunk_max)
    exps = tl.exp(x - finite_max)
    return chunk_max, exps, tl.sum(exps, 0), tl.sum(exps * u, 0)


@triton.jit
def publish_stats(stats_ptr, count_ptr, row, slot, chunk_max, chunk_norm, chunk_dot):
    """Store one chunk's three numbers, then count them as published (release)."""
    tl.store(stats_ptr + slot * 3, chunk_max)
    tl.store(stats_ptr + slot * 3 + 1, chunk_norm)
    tl.store(stats_ptr + slot * 3 + 2, chunk_dot)
    tl.debug_barrier()
    tl.atomic_add(count_ptr + row, 1, sem="release")


@triton.jit
def poll_published(count_ptr, row, expected, MAX_SPIN: tl.constexpr):
    """The row's published count, polled until it reaches ``expected`` or ``MAX_SPIN`` polls."""
    published = tl.load(count_ptr + row, volatile=True)
    polls = 0
    while (published < expected) & (polls < MAX_SPIN):
        published = tl.load(count_ptr + row, volatile=True)
        polls += 1
    return published


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
    No -inf guard on the row max, unlike the designs' ``_merge_slots``: a row of only -inf logits
    has no softmax (eager gives NaN for it too).
    """
    first_slot = row * num_chunks
    if was_claimed == 0:
        publish_stats(stats_ptr, count_ptr, row, first_slot + chunk, own_max, own_norm, own_dot)
    published = poll_published(count_ptr, row, num_chunks, MAX_SPIN)
    if published < num_chunks:
        # Siblings are late: compute every chunk nobody has claimed yet from memory.
        for other_chunk in range(0, num_chunks):
            other_claimed = tl.atomic_cas(claim_ptr + first_slot + other_chunk, 0, 1)
            if other_claimed == 0:
                x_other, u_other = load_tile(
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
                    False,
                )
                other_max, _, other_norm, other_dot = _chunk_stats(x_other, u_other)
                publish_stats(
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


@dataclass(frozen=True)
class KernelConfig:
    """Chunk length (entries of a row per program) and warps per program."""

    block: int
    num_warps: int


def _candidate_configs(vocab: int) -> list[KernelConfig]:
    """Configs worth timing for this vocabulary size (8 to 32 entries of x and u per thread)."""
    whole_row = triton.next_power_of_2(vocab)
    if whole_row <= 4096:
        warps = [w for w in (1, 2, 4, 8) if whole_row >= 64 * w] or [1]
        return [KernelConfig(whole_row, w) for w in warps]
    split = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]
    configs = [KernelConfig(block, warps) for block, warps in split if block < vocab]
    if whole_row <= 16384:
        configs.append(KernelConfig(whole_row, 16))
    return configs


def _default_config(vocab: int) -> KernelConfig:
    """Config used when tuning is off (interpreter, or TORCH_LINOP_CE_HVP_AUTOTUNE=0)."""
    whole_row = triton.next_power_of_2(vocab)
    if whole_row <= 4096:
        return KernelConfig(whole_row, max(1, min(8, whole_row // 256)))
    return KernelConfig(min(whole_row, 16384), 16)  # fastest or near it at every H200 shape


_tuned: dict[tuple, KernelConfig] = {}
_tuning_timings: dict[tuple, dict[KernelConfig, float]] = {}


def tuned_configs() -> dict[tuple, KernelConfig]:
    """The configs picked so far by the autotuner, keyed by problem signature (for benchmarks)."""
    return dict(_tuned)


def tuning_timings() -> dict[tuple, dict[KernelConfig, float]]:
    """Median milliseconds of every candidate timed by the autotuner (on the leading rows)."""
    return {key: dict(timings) for key, timings in _tuning_timings.items()}


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
    common = launch_arguments(
        logits, u, labels, out, ignore_index=ignore_index, shift=shift, scale=scale
    )
    device = logits.device
    if num_chunks > 1:
        # One zeroed allocation holds the per-chunk claims and the per-row published counts.
        sync = torch.zeros(num_rows * num_chunks + num_rows, dtype=torch.int32, device=device)
        claim, count = sync[: num_rows * num_chunks], sync[num_rows * num_chunks :]
        stats = torch.empty(num_rows * num_chunks * 3, dtype=common.acc_dtype, device=device)
    else:
        claim = count = torch.empty(1, dtype=torch.int32, device=device)
        stats = torch.empty(1, dtype=common.acc_dtype, device=device)
    _ce_hvp_kernel[(num_rows * num_chunks,)](
        *common.pointers,
        claim,
        count,
        stats,
        seq_len,
        vocab,
        num_chunks,
        *common.scalars,
        **common.constexprs,
        BLOCK=config.block,
        CHUNKS_POW2=triton.next_power_of_2(num_chunks),
        MAX_SPIN=0 if is_interpreter() else _POLLS_BEFORE_CLAIMING,
        num_warps=config.num_warps,
    )


def _tune(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Time every candidate config on the leading rows (about 256 MB of logits): the best and all
    timings (none when there is one candidate).

    Writes into the leading rows of ``out`` (overwritten by the real launch afterwards), or into a
    temporary buffer when ``out`` aliases ``u`` (the in-place mode), so tuning never changes u.
    """
    vocab = logits.shape[-1]
    candidates = _candidate_configs(vocab)
    if len(candidates) == 1:
        return candidates[0], {}
    tune_rows = max(256, (1 << 28) // (vocab * logits.element_size()))

    run = functools.partial(_launch, ignore_index=ignore_index, shift=shift, scale=scale)
    return fastest_config(
        run, candidates, logits, u, labels, out, tune_rows=tune_rows, kernel_name="split kernel"
    )


def ce_hvp_split(
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
        key = (
            logits.device.index,
            vocab,
            logits.dtype,
            u.dtype,
            out.dtype,
            labels is not None,
            shift,
            is_inner_contiguous(logits),
            is_inner_contiguous(u),
            is_inner_contiguous(out),
        )
        config = pick_config(
            key,
            _tuned,
            _tuning_timings,
            lambda: _default_config(vocab),
            lambda: _tune(
                logits, u, labels, out, ignore_index=ignore_index, shift=shift, scale=scale
            ),
        )
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
