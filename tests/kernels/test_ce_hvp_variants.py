"""The alternative ce_hvp Triton kernels (``kernels/_ce_hvp_variants.py``) against float64 oracles.

Oracles: the explicit block-diagonal softmax Hessian (diag(p) - p p^T per row with a target) for
V <= 1000, and the double-backward Hessian-vector product of ``F.cross_entropy`` in float64 for
larger V; half-precision inputs are compared with the oracle on the same rounded inputs. Every
variant runs with a config that splits rows into several chunks (and, for the split variants,
into segments of unequal length) and with its default config.

On CPU the kernels run through ``TRITON_INTERPRET=1`` in one subprocess (the variable must be set
before Triton is imported); there, programs run one after another, so the split-row kernel's
first program of a row claims and computes its siblings' segments (the claim path) and the later
ones find them published. On a CUDA machine the same cases run natively, plus forced claim races.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
VARIANT_NAMES = ("two_pass", "split_coop", "split_two_kernel", "current_sweep")


@dataclass(frozen=True)
class Case:
    """One input configuration; inputs are drawn from a seed derived from ``name``."""

    name: str
    rows: tuple[int, ...]  # (N,) or (B, T)
    vocab: int
    dtype: torch.dtype = torch.float32
    u_dtype: torch.dtype | None = None  # None: same as dtype
    labels: str = "some_ignored"  # "none" | "some_ignored" | "all_ignored"
    shift: bool = False
    reduction: str = "mean"
    layout: str = "contiguous"  # "contiguous" | "vocab_strided" | "permuted"
    spike: bool = False
    masked_vocab: int = 0  # logits[..., :masked_vocab] = -inf (whole chunks of zero probability)
    write: str = "out"  # "out" (NaN-poisoned buffer) | "inplace" (into a copy of u)
    # "split" (several chunks, unequal segments), "prefetch" (the same, loading a chunk ahead),
    # "default" (untuned config), "tile" (split_coop with one chunk per program, in registers)
    configs: tuple[str, ...] = ("split", "default")


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CASES = [
    *[
        Case(
            f"v{vocab}_{DTYPE_NAMES[dtype]}",
            rows,
            vocab,
            dtype,
            configs=("split", "prefetch")
            if vocab >= 1000 and dtype != torch.float16
            else ("split",),
        )
        for vocab, rows in ((7, (2, 3)), (100, (2, 3)), (1000, (2, 3)), (5000, (1, 3)))
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ],
    Case("v5000_default", (1, 3), 5000, shift=True, configs=("default",)),
    Case("v1000_tile_bf16", (2, 3), 1000, torch.bfloat16, configs=("tile",)),
    Case("all_ignored", (2, 3), 100, labels="all_ignored", configs=("split", "default", "tile")),
    Case("spike_fp32", (1, 3), 1000, spike=True),
    Case("spike_bf16", (1, 3), 1000, torch.bfloat16, spike=True, configs=("split", "tile")),
    Case(
        "strided_vocab_shift",
        (2, 3),
        1000,
        layout="vocab_strided",
        shift=True,
        configs=("split", "default", "prefetch"),
    ),
    Case("permuted_batch_time", (2, 3), 100, torch.bfloat16, layout="permuted", shift=True),
    Case("shift_labels", (2, 5), 100, shift=True, configs=("split", "tile")),
    Case("shift_no_labels", (3, 4), 100, labels="none", shift=True, configs=("split",)),
    Case("odd_rows_no_labels", (11,), 100, labels="none", configs=("split",)),
    Case("odd_rows_shift", (1, 13), 1000, shift=True, configs=("prefetch",)),
    Case("masked_vocab", (2, 3), 1000, shift=True, masked_vocab=300, configs=("prefetch", "tile")),
    Case("inplace_shift", (2, 3), 1000, shift=True, write="inplace", configs=("prefetch", "tile")),
    Case("inplace_bf16", (2, 3), 1000, torch.bfloat16, write="inplace", configs=("default",)),
    Case("sum_reduction", (2, 3), 100, shift=True, reduction="sum", configs=("split",)),
    Case("fp64_no_labels", (2, 3), 100, torch.float64, labels="none"),
    Case("fp64_shift", (2, 3), 1000, torch.float64, shift=True, configs=("split", "prefetch")),
    Case("bf16_logits_fp32_u", (2, 3), 100, torch.bfloat16, u_dtype=torch.float32),
]
CASES_BY_NAME = {case.name: case for case in CASES}
VARIANTS_BY_CONFIG = {
    "split": VARIANT_NAMES,
    "default": VARIANT_NAMES,
    "prefetch": ("two_pass", "split_coop", "split_two_kernel"),
    "tile": ("split_coop",),
}
RUNS = [
    (case, variant, config)
    for case in CASES
    for config in case.configs
    for variant in VARIANTS_BY_CONFIG[config]
]


def run_id(case: Case, variant: str, config: str) -> str:
    return f"{case.name}-{variant}-{config}"


def make_inputs(
    case: Case, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, tangent and labels; drawn on CPU from the case's seed, laid out on ``device``."""
    generator = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    rows, vocab = case.rows, case.vocab

    def draw(dtype: torch.dtype, spread: float) -> torch.Tensor:
        if case.layout == "vocab_strided":  # stride of the vocab axis is the number of rows
            base = torch.randn(vocab, *rows, generator=generator) * spread
            return base.to(dtype).to(device).permute(*range(1, len(rows) + 1), 0)
        if case.layout == "permuted":  # (T, B, V) memory viewed as (B, T, V)
            base = torch.randn(*reversed(rows), vocab, generator=generator) * spread
            return base.to(dtype).to(device).transpose(0, 1)
        return (torch.randn(*rows, vocab, generator=generator) * spread).to(dtype).to(device)

    logits = draw(case.dtype, 3.0)
    if case.spike:
        logits[(0,) * len(rows) + (3,)] += 50.0
    if case.masked_vocab:
        logits[..., : case.masked_vocab] = float("-inf")
    u = draw(case.u_dtype or case.dtype, 1.0)
    if case.labels == "none":
        return logits, u, None
    labels = torch.randint(0, vocab, rows, generator=generator)
    if case.labels == "all_ignored":
        labels.fill_(IGNORE)
    else:
        flat = labels.view(-1)
        flat[1 :: max(2, flat.numel() // 3)] = IGNORE
    return logits, u, labels.to(device)


def variant_config(variant: str, config: str, vocab: int):
    """``default``: the variant's untuned config; ``split``: several chunks per row and, for the
    split variants, segments of three chunks (the last one shorter); ``prefetch``: ``split``
    loading one chunk ahead; ``tile``: one chunk per split_coop program, kept in registers."""
    from torch_linop.kernels import _ce_hvp_variants as variants

    if config == "default":
        return variants.default_config(variant, vocab)
    block = max(8, triton_next_power_of_2(vocab) // (8 if vocab > 4096 else 4))
    seg_chunks = 1 if config == "tile" else 3
    return variants.VariantConfig(
        block,
        max(1, min(8, block // 512)),  # at most 16 entries per thread on a GPU
        seg_chunks=seg_chunks,
        programs_per_sm=1,
        block_mb=1,
        prefetch=config == "prefetch",
    )


def triton_next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def scale_for(case: Case, labels: torch.Tensor | None) -> torch.Tensor | float:
    """The factor ce_hvp passes to its Triton launcher (1 / rows with a target for "mean")."""
    from torch_linop.kernels._ce_hvp_reference import loss_scale

    rows_shape = torch.Size((1, *case.rows) if len(case.rows) == 1 else case.rows)
    labels_2d = None if labels is None else labels.reshape(rows_shape)
    accumulate = torch.float64 if case.dtype == torch.float64 else torch.float32
    return loss_scale(
        labels_2d,
        rows_shape,
        ignore_index=IGNORE,
        shift=case.shift,
        reduction=case.reduction,
        device=torch.device("cpu") if labels is None else labels.device,
        dtype=accumulate,
    )


def run_variant(case: Case, variant: str, config: str, logits, u, labels) -> torch.Tensor:
    """Launch a variant as ce_hvp would: (B, T, V) views, output buffer or in place into u's copy."""
    from torch_linop.kernels import _ce_hvp_variants as variants

    as_3d = (lambda t: t.unsqueeze(0)) if len(case.rows) == 1 else (lambda t: t)
    labels_2d = None if labels is None else as_3d(labels)
    result_dtype = torch.promote_types(logits.dtype, u.dtype)
    if case.write == "inplace":
        out = u.clone()
        source = out
    else:
        out = torch.full(logits.shape, float("nan"), dtype=result_dtype, device=u.device)
        source = u
    returned = variants.VARIANTS[variant](
        as_3d(logits),
        as_3d(source),
        labels_2d,
        as_3d(out),
        ignore_index=IGNORE,
        shift=case.shift,
        scale=scale_for(case, labels),
        config=variant_config(variant, config, case.vocab),
    )
    assert returned.data_ptr() == out.data_ptr()
    return out


def rows_with_target(case: Case, labels: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B, T) mask, written out position by position (independent of the library)."""
    batch, seq_len = (1, *case.rows) if len(case.rows) == 1 else case.rows
    labels_2d = None if labels is None else labels.reshape(batch, seq_len).cpu()
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        for t in range(seq_len):
            target_t = t + 1 if case.shift else t
            if target_t < seq_len:
                mask[b, t] = labels_2d is None or bool(labels_2d[b, target_t] != IGNORE)
    return mask


def dense_oracle(case: Case, logits: torch.Tensor, u: torch.Tensor, labels) -> torch.Tensor:
    """The block-diagonal Hessian in float64, one explicit (V x V) block per row, times u."""
    mask = rows_with_target(case, labels).reshape(-1)
    probs = torch.softmax(logits.double().cpu().reshape(-1, case.vocab), dim=-1)
    tangents = u.double().cpu().reshape(-1, case.vocab)
    num_valid = int(mask.sum())
    scale = 1.0 / num_valid if case.reduction == "mean" and num_valid else 1.0
    products = torch.zeros_like(tangents)
    for row, (p, valid) in enumerate(zip(probs, mask, strict=True)):
        if valid:
            products[row] = ((torch.diag(p) - torch.outer(p, p)) * scale) @ tangents[row]
    return products.reshape(logits.shape)


def autograd_oracle(case: Case, logits: torch.Tensor, u: torch.Tensor, labels) -> torch.Tensor:
    """Double-backward HVP of F.cross_entropy (HF causal-LM shift) in float64, on CPU."""
    x = logits.detach().double().cpu().reshape(-1, *logits.shape[-2:]).requires_grad_(True)
    tangent = u.double().cpu().reshape(x.shape)
    if labels is None:
        targets = torch.zeros(x.shape[:-1], dtype=torch.long)
    else:
        targets = labels.cpu().reshape(x.shape[:-1])
    x_scored = x[:, :-1] if case.shift else x
    if case.shift:
        targets = targets[:, 1:]
    if targets.numel() == 0 or bool((targets == IGNORE).all()):
        return torch.zeros(logits.shape, dtype=torch.float64)
    loss = F.cross_entropy(
        x_scored.reshape(-1, case.vocab),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction=case.reduction,
    )
    (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
    (product,) = torch.autograd.grad((gradient * tangent).sum(), x)
    return product.reshape(logits.shape)


def tolerance(case: Case) -> float:
    """Relative error allowed: output rounding for half types, summation error for fp32."""
    dtypes = {case.dtype, case.u_dtype or case.dtype}
    if torch.float64 in dtypes:
        return 1e-12
    if torch.bfloat16 in dtypes and case.u_dtype != torch.float32:
        return 1.2e-2  # 8-bit mantissa; the interpreter truncates fp32 -> bf16 instead of rounding
    if torch.float16 in dtypes:
        return 2e-3
    return 5e-6


def check_against_oracle(case: Case, result: torch.Tensor, logits, u, labels) -> None:
    if case.vocab <= 1000:
        expected = dense_oracle(case, logits, u, labels)
    else:
        expected = autograd_oracle(case, logits, u, labels)
    result = result.cpu()
    assert result.shape == logits.shape
    assert result.dtype == torch.promote_types(logits.dtype, u.dtype)
    assert torch.isfinite(result).all(), "non-finite entries (unwritten NaN poison or overflow)"
    mask = rows_with_target(case, labels).reshape(logits.shape[:-1])
    assert torch.equal(result[~mask], torch.zeros_like(result[~mask])), "rows without target"
    if not mask.any():
        return
    diff = (result.double() - expected)[mask]
    # The error of the best answer representable in the result dtype is allowed on top (fp16
    # results of V = 5000 rows are subnormal).
    unavoidable = (expected.to(result.dtype).double() - expected)[mask]
    relative = ((diff.norm() - 2 * unavoidable.norm()) / expected[mask].norm()).item()
    assert relative < tolerance(case), f"relative error {relative:.2e}"
    # Per row, against the forward-error scale |p| (|u| + max |u|) of p (u - <p, u>): a plain
    # relative error means nothing on a near-one-hot row (the +50 spike), whose product is ~0.
    scale = 1.0 / int(mask.sum()) if case.reduction == "mean" else 1.0
    probs = torch.softmax(logits.double().cpu(), dim=-1)[mask]
    u_abs = u.double().abs().cpu()[mask]
    error_scale = scale * (probs * (u_abs + u_abs.amax(-1, keepdim=True))).norm(dim=-1)
    row_excess = diff.norm(dim=-1) - 2 * unavoidable.norm(dim=-1)
    worst_row = (row_excess / error_scale).max().item()
    assert worst_row < tolerance(case), f"worst row error {worst_row:.2e}"


_INTERPRETER_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("ce_hvp_variant_cases", sys.argv[1])
cases = sys.modules["ce_hvp_variant_cases"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
from torch_linop.kernels import _ce_hvp_triton
assert _ce_hvp_triton.is_interpreter()
inputs = torch.load(sys.argv[2])
results = {}
for case, variant, config in cases.RUNS:
    args = inputs[case.name]
    results[cases.run_id(case, variant, config)] = cases.run_variant(case, variant, config, *args)
results["tuning"] = cases.tuning_facts()
sys.path.insert(0, str(cases.ROOT))
from benchmarks.ce_hvp_variants import main as benchmark_main
results["smoke_rc"] = benchmark_main(["--smoke", "--out", sys.argv[4]])
torch.save(results, sys.argv[3])
"""


def tuning_facts() -> dict:
    """Run the tuner in place (out aliasing u) with two candidates; report what it did."""
    from torch_linop.kernels import _ce_hvp_variants as variants

    case = CASES_BY_NAME["inplace_shift"]
    logits, u, labels = make_inputs(case)
    buffer = u.clone()
    candidates = [variant_config("split_coop", name, case.vocab) for name in ("split", "tile")]
    best, timings = variants.tune(
        "split_coop",
        logits,
        buffer,
        labels,
        buffer,
        ignore_index=IGNORE,
        shift=True,
        scale=scale_for(case, labels),
        candidates=candidates,
    )
    return {
        "u_unchanged": bool(torch.equal(buffer, u)),
        "best_is_candidate": best in candidates,
        "timed": sorted(config.seg_chunks for config in timings),
    }


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    """Outputs of every (case, variant, config) run, the tuner's behaviour and the benchmark's
    smoke run, computed in one TRITON_INTERPRET=1 process (one Triton import)."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("ce_hvp_variants_interpreter")
    inputs_path, results_path = folder / "inputs.pt", folder / "results.pt"
    torch.save({case.name: make_inputs(case) for case in CASES}, inputs_path)
    env = dict(os.environ, TRITON_INTERPRET="1", TORCH_LINOP_CE_HVP_AUTOTUNE="0")
    completed = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, __file__, inputs_path, results_path]
        + [str(folder / "smoke")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if "only 0-dimensional arrays can be converted" in completed.stderr:
        # Triton < 3.7's interpreter with numpy >= 2.4 (the GPU image): an environment limit
        pytest.skip("this Triton's interpreter does not work with this numpy")
    assert completed.returncode == 0, f"interpreter run failed:\n{completed.stderr[-4000:]}"
    results = torch.load(results_path)
    results["smoke_folder"] = folder / "smoke"
    return results


@pytest.mark.parametrize(("case", "variant", "config"), RUNS, ids=[run_id(*run) for run in RUNS])
def test_interpreter_matches_oracle(case: Case, variant: str, config: str, interpreter_results):
    logits, u, labels = make_inputs(case)
    result = interpreter_results[run_id(case, variant, config)]
    check_against_oracle(case, result, logits, u, labels)


def test_tuning_in_place_leaves_u_intact_and_times_every_candidate(interpreter_results):
    facts = interpreter_results["tuning"]
    assert facts["u_unchanged"], "tuning with out aliasing u wrote into u"
    assert facts["best_is_candidate"]
    assert facts["timed"] == [1, 3]


def test_split_configs_really_split_rows():
    """The 'split' configs give several chunks per row and unequal segments (else the multi-chunk
    and claim paths would go untested)."""
    for vocab in (100, 1000, 5000):
        config = variant_config("split_coop", "split", vocab)
        chunks = -(-vocab // config.block)
        segments = -(-chunks // config.seg_chunks)
        assert chunks >= 4 and segments >= 2 and chunks % config.seg_chunks != 0, vocab


@pytest.mark.parametrize(
    ("regs", "shared", "warps", "expected"),
    [
        (58, 32, 8, 4),  # 256 threads x 64 registers (rounded up per warp) = 16 K of 64 K
        (118, 32, 8, 2),  # 120 registers per thread -> 30 K per program
        (128, 64, 16, 1),  # 512 threads x 128 = the whole register file
        (32, 16, 1, 32),  # tiny programs: capped at 32 per SM
        (40, 16, 4, 12),  # 2048 threads / 128 = 16 by threads; 65536 / (40*32*4) -> 12 by registers
        (32, 100_000, 4, 2),  # shared memory: 228 KB / (100 KB + 1 KB reserved)
    ],
)
def test_resident_programs(regs: int, shared: int, warps: int, expected: int) -> None:
    from torch_linop.kernels._ce_hvp_variants import resident_programs

    limits = dict(regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=228 * 1024)
    assert resident_programs(regs, shared, warps, **limits) == expected


def test_benchmark_smoke(interpreter_results) -> None:
    """``benchmarks/ce_hvp_variants.py --smoke`` (its ``main``, run in the interpreter process) on
    tiny shapes: every variant ran, was checked against eager, and the table lists it."""
    assert interpreter_results["smoke_rc"] == 0
    tmp_path = interpreter_results["smoke_folder"]
    report = json.loads((tmp_path / "ce_hvp_variants.json").read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        for name in ("current", *VARIANT_NAMES):
            assert f"{name}_error" not in row, row[f"{name}_error"]
            check = row[f"{name}_check"]
            assert check["all_written"] and check["max_rel_err"] < 2e-2, (name, check)
            assert row[f"{name}_ms"] > 0
        for name in VARIANT_NAMES:
            assert len(row[f"{name}_candidates_ms"]) == 2, name
    table = (tmp_path / "ce_hvp_variants.md").read_text()
    assert all(name in table for name in VARIANT_NAMES)


# ----------------------------------------------------------------------------------------------
# CUDA: the kernels natively, and the split-row kernel's claim path under real races.
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize(("case", "variant", "config"), RUNS, ids=[run_id(*run) for run in RUNS])
def test_cuda_matches_oracle(case: Case, variant: str, config: str, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_LINOP_CE_HVP_AUTOTUNE", "0")
    logits, u, labels = make_inputs(case, "cuda")
    result = run_variant(case, variant, config, logits, u, labels)
    check_against_oracle(case, result, logits, u, labels)


@cuda_only
@pytest.mark.parametrize("polls", [0, 2])
@pytest.mark.parametrize("write", ["out", "inplace"])
@pytest.mark.parametrize("config", ["split", "tile"])
def test_cuda_split_coop_claim_path(monkeypatch, polls: int, write: str, config: str) -> None:
    """Programs give up waiting almost at once and claim their siblings' segments: races."""
    from torch_linop.kernels import _ce_hvp_variants as variants

    monkeypatch.setattr(variants, "_POLLS_BEFORE_CLAIMING", polls)
    case = Case(f"claims_{polls}_{write}", (4, 128), 50304, torch.bfloat16, shift=True, write=write)
    logits, u, labels = make_inputs(case, "cuda")
    for _ in range(2):
        result = run_variant(case, "split_coop", config, logits, u, labels)
        check_against_oracle(case, result, logits, u, labels)


@cuda_only
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_cuda_autotuned_large_vocab(variant: str, monkeypatch) -> None:
    """Autotuned launch at a real vocabulary size, in place (tuning must not touch u)."""
    from torch_linop.kernels import _ce_hvp_variants as variants

    monkeypatch.setattr(variants, "_tuned", {})
    case = Case(f"tuned_{variant}", (8, 256), 50304, torch.bfloat16, shift=True, write="inplace")
    logits, u, labels = make_inputs(case, "cuda")
    buffer = u.clone()
    variants.VARIANTS[variant](
        logits,
        buffer,
        labels,
        buffer,
        ignore_index=IGNORE,
        shift=True,
        scale=scale_for(case, labels),
    )
    check_against_oracle(case, buffer, logits, u, labels)
    assert variants.tuned_configs(), "the call should have autotuned"
