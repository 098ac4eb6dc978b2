"""The ce_hvp Triton designs with forced configs against float64 oracles.

The shipped two-pass kernel (``kernels/_ce_hvp_two_pass.py``) and the benchmark's unshipped
designs (``benchmarks/ce_hvp_designs.py``: ``split_coop``, ``split_two_kernel``,
``current_sweep``) each run with a config that splits rows into several chunks (and, for the split
designs, into segments of unequal length) and with their default config. Cases, inputs, oracles
and checks are shared with ``test_ce_hvp.py`` through ``tests/kernels/conftest.py``.

On CPU the kernels run through ``TRITON_INTERPRET=1`` in one subprocess (the variable must be set
before Triton is imported); there, programs run one after another, so the split-row kernel's
first program of a row claims and computes its siblings' segments (the claim path) and the later
ones find them published. On a CUDA machine the same runs go natively, plus forced claim races.
The shipped kernels also compile for sm_90 on the CPU (Triton's compiler needs no GPU): the
interpreter runs Python and misses what only the compiler rejects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the designs live in benchmarks/, outside the package
    sys.path.insert(0, str(ROOT))


def variant_config(variant: str, config: str, vocab: int):
    """``default``: the design's untuned config; ``split``: several chunks per row and, for the
    split designs, segments of three chunks (the last one shorter); ``prefetch``: ``split``
    loading one chunk ahead; ``tile``: one chunk per split_coop program, kept in registers.
    The shipped two-pass kernel gets its own config type (it has no segments or row blocks)."""
    from benchmarks import ce_hvp_designs as designs
    from torch_linop.kernels import _ce_hvp_two_pass as two_pass

    if config == "default":
        if variant == "two_pass":
            return two_pass.default_config(vocab)
        return designs.default_config(variant, vocab)
    block = max(8, triton_next_power_of_2(vocab) // (8 if vocab > 4096 else 4))
    num_warps = max(1, min(8, block // 512))  # at most 16 entries per thread on a GPU
    if variant == "two_pass":
        return two_pass.TwoPassConfig(block, num_warps, prefetch=config == "prefetch")
    return designs.VariantConfig(
        block,
        num_warps,
        seg_chunks=1 if config == "tile" else 3,
        programs_per_sm=1,
        block_mb=1,
        prefetch=config == "prefetch",
    )


def launcher(variant: str):
    """The shipped ``ce_hvp_two_pass`` for "two_pass", else the benchmark's design."""
    from benchmarks import ce_hvp_designs as designs
    from torch_linop.kernels import _ce_hvp_two_pass as two_pass

    return two_pass.ce_hvp_two_pass if variant == "two_pass" else designs.VARIANTS[variant]


def triton_next_power_of_2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def scale_for(case, labels: torch.Tensor | None) -> torch.Tensor | float:
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


def run_variant(case, variant: str, config: str, logits, u, labels) -> torch.Tensor:
    """Launch a design as ce_hvp would: (B, T, V) views, NaN-poisoned output buffer, or in place
    into a copy of u."""
    as_3d = (lambda t: t.unsqueeze(0)) if len(case.rows) == 1 else (lambda t: t)
    labels_2d = None if labels is None else as_3d(labels)
    result_dtype = torch.promote_types(logits.dtype, u.dtype)
    if case.write == "inplace":
        out = u.clone()
        source = out
    else:
        out = torch.full(logits.shape, float("nan"), dtype=result_dtype, device=u.device)
        source = u
    returned = launcher(variant)(
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


_INTERPRETER_SCRIPT = """
from torch_linop.kernels import _ce_hvp_common
assert _ce_hvp_common.is_interpreter()
results = {}
for case, variant, config in cases.DESIGN_RUNS:
    args = inputs[case.name]
    results[cases.run_id(case, variant, config)] = tests.run_variant(case, variant, config, *args)
results["tuning"] = tests.tuning_facts(cases)
from benchmarks.ce_hvp_variants import main as benchmark_main
results["smoke_rc"] = benchmark_main(["--smoke", "--out", sys.argv[5]])
torch.save(results, results_path)
"""


def tuning_facts(kernel_cases) -> dict:
    """Run the tuner in place (out aliasing u) with two candidates; report what it did."""
    from benchmarks import ce_hvp_designs as designs

    case = kernel_cases.CASES_BY_NAME["inplace_shift"]
    logits, u, labels = kernel_cases.make_inputs(case)
    buffer = u.clone()
    candidates = [variant_config("split_coop", name, case.vocab) for name in ("split", "tile")]
    best, timings = designs.tune(
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
def interpreter_results(tmp_path_factory, kernel_cases) -> dict:
    """Outputs of every (case, design, config) run, the tuner's behaviour and the benchmark's
    smoke run, computed in one TRITON_INTERPRET=1 process (one Triton import)."""
    folder = tmp_path_factory.mktemp("ce_hvp_variants_interpreter")
    used = {case.name: case for case, _, _ in kernel_cases.DESIGN_RUNS}
    inputs = {name: kernel_cases.make_inputs(case) for name, case in used.items()}
    results = kernel_cases.run_in_interpreter(
        _INTERPRETER_SCRIPT,
        __file__,
        folder,
        inputs,
        str(folder / "smoke"),
        TORCH_LINOP_CE_HVP_AUTOTUNE="0",
    )
    results["smoke_folder"] = folder / "smoke"
    return results


def test_interpreter_matches_oracle(design_run, kernel_cases, interpreter_results):
    case = design_run[0]
    logits, u, labels = kernel_cases.make_inputs(case)
    result = interpreter_results[kernel_cases.run_id(*design_run)]
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


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
    from torch_linop.kernels._ce_hvp_two_pass import resident_programs

    limits = dict(regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=228 * 1024)
    assert resident_programs(regs, shared, warps, **limits) == expected


def test_benchmark_smoke(interpreter_results, kernel_cases) -> None:
    """``benchmarks/ce_hvp_variants.py --smoke`` (its ``main``, run in the interpreter process) on
    tiny shapes: every variant ran, was checked against eager, and the table lists it."""
    assert interpreter_results["smoke_rc"] == 0
    tmp_path = interpreter_results["smoke_folder"]
    report = json.loads((tmp_path / "ce_hvp_variants.json").read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        for name in ("current", *kernel_cases.DESIGN_NAMES):
            assert f"{name}_error" not in row, row[f"{name}_error"]
            check = row[f"{name}_check"]
            assert check["all_written"] and check["max_rel_err"] < 2e-2, (name, check)
            assert row[f"{name}_ms"] > 0
        for name in kernel_cases.DESIGN_NAMES:
            assert len(row[f"{name}_candidates_ms"]) == 2, name
    table = (tmp_path / "ce_hvp_variants.md").read_text()
    assert all(name in table for name in kernel_cases.DESIGN_NAMES)


# ----------------------------------------------------------------------------------------------
# CUDA: the kernels natively, and the split-row kernel's claim path under real races.
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
def test_cuda_matches_oracle(design_run, kernel_cases, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_LINOP_CE_HVP_AUTOTUNE", "0")
    case = design_run[0]
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    result = run_variant(*design_run, logits, u, labels)
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


@cuda_only
@pytest.mark.xfail(
    reason="split_coop (a benchmark-only design, never dispatched) writes non-finite entries on "
    "the H200 when its programs claim their siblings' segments (forced here by a poll budget of "
    "0-2; measured 2026-11-28, third session); the shipped split kernel's claim path passes",
    strict=False,
)
@pytest.mark.parametrize("polls", [0, 2])
@pytest.mark.parametrize("write", ["out", "inplace"])
@pytest.mark.parametrize("config", ["split", "tile"])
def test_cuda_split_coop_claim_path(
    monkeypatch, polls: int, write: str, config: str, kernel_cases
) -> None:
    """Programs give up waiting almost at once and claim their siblings' segments: races."""
    from benchmarks import ce_hvp_designs as designs

    monkeypatch.setattr(designs, "_POLLS_BEFORE_CLAIMING", polls)
    case = kernel_cases.Case(
        f"claims_{polls}_{write}", (4, 128), 50304, torch.bfloat16, shift=True, write=write
    )
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    for _ in range(2):
        result = run_variant(case, "split_coop", config, logits, u, labels)
        kernel_cases.check_against_oracle(case, result, logits, u, labels)


@cuda_only
def test_cuda_autotuned_large_vocab(design_name: str, monkeypatch, kernel_cases) -> None:
    """Autotuned launch at a real vocabulary size, in place (tuning must not touch u)."""
    from benchmarks import ce_hvp_designs as designs
    from torch_linop.kernels import _ce_hvp_two_pass as two_pass

    variant = design_name
    tuner = two_pass if variant == "two_pass" else designs
    monkeypatch.setattr(tuner, "_tuned", {})
    case = kernel_cases.Case(
        f"tuned_{variant}", (8, 256), 50304, torch.bfloat16, shift=True, write="inplace"
    )
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    buffer = u.clone()
    launcher(variant)(
        logits,
        buffer,
        labels,
        buffer,
        ignore_index=IGNORE,
        shift=True,
        scale=scale_for(case, labels),
    )
    kernel_cases.check_against_oracle(case, buffer, logits, u, labels)
    assert tuner.tuned_configs(), "the call should have autotuned"
