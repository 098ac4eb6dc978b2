"""The ce_hvp Triton designs with forced configs against float64 oracles (marker ``designs``).

Not in the default run (``pyproject.toml`` deselects ``designs``): run them with
``python -m pytest tests/kernels -m designs``.

The shipped two-pass kernel (``kernels/_ce_hvp_two_pass.py``) and the benchmark's unshipped
designs (``benchmarks/ce_hvp_designs.py``: ``split_coop``, ``split_two_kernel``,
``current_sweep``, the last being the split-row kernel of ``benchmarks/ce_hvp_split.py``) each run with a config that splits rows into several chunks (and, for the split
designs, into segments of unequal length) and with their default config. Cases, inputs, oracles
and checks are shared with ``test_ce_hvp.py`` through ``tests/kernels/conftest.py``. The design
``two_pass_lanes`` (the two-pass kernel with per-lane pass-1 numbers) runs every (case, config)
that ``two_pass`` runs, plus two large vocabularies at its default config (``LANES_RUNS``).

On CPU the kernels run through ``TRITON_INTERPRET=1`` in one subprocess (the variable must be set
before Triton is imported); there, programs run one after another, so the split-row kernel's
first program of a row claims and computes its siblings' segments (the claim path) and the later
ones find them published. On a CUDA machine the same runs go natively, plus forced claim races.
The shipped kernels also compile for sm_90 on the CPU (Triton's compiler needs no GPU): the
interpreter runs Python and misses what only the compiler rejects. ``two_pass_lanes`` is compiled
here at every candidate config, as a real launch specialises it, and checked for spills.
"""

from __future__ import annotations

import importlib.util
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
LANES = "two_pass_lanes"
pytestmark = pytest.mark.designs


def _case_table():
    """conftest.py as pytest (or an interpreter subprocess) loaded it, found by its path (test files
    cannot import it by name), else loaded by path: the (case, config) list of ``two_pass_lanes``
    is needed at collection time."""
    path = Path(__file__).with_name("conftest.py").resolve()
    for module in list(sys.modules.values()):
        if Path(getattr(module, "__file__", None) or "").resolve() == path:
            return module
    spec = importlib.util.spec_from_file_location("ce_hvp_case_table", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (case name, config name) runs of two_pass_lanes: those of two_pass (every vocabulary size,
# dtype, layout, shift/labels/ignore_index, in-place, spike and all-ignored case it runs), plus two
# large vocabularies (not multiples of the chunk) at the default config of 8192-entry chunks.
LANES_RUNS = [
    *(
        (case.name, config)
        for case, design, config in _case_table().DESIGN_RUNS
        if design == "two_pass"
    ),
    ("v50257_bf16", "default"),
    ("v130000_fp32", "default"),
]


def variant_config(variant: str, config: str, vocab: int):
    """``default``: the design's untuned config; ``split``: several chunks per row and, for the
    split designs, segments of three chunks (the last one shorter); ``prefetch``: ``split``
    loading one chunk ahead; ``tile``: one chunk per split_coop program, kept in registers.
    The shipped two-pass kernel gets its own config type (it has no segments or row blocks), and
    ``two_pass_lanes``, which has neither either, leaves them unset."""
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
    if variant == LANES:
        return designs.VariantConfig(block, num_warps, prefetch=config == "prefetch")
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
for name, config in tests.LANES_RUNS:
    case = cases.CASES_BY_NAME[name]
    results[cases.run_id(case, tests.LANES, config)] = tests.run_variant(
        case, tests.LANES, config, *inputs[name]
    )
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
    used.update((name, kernel_cases.CASES_BY_NAME[name]) for name, _ in LANES_RUNS)
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


@pytest.mark.parametrize(
    ("case_name", "config"), LANES_RUNS, ids=[f"{c}-{n}" for c, n in LANES_RUNS]
)
def test_lanes_interpreter_matches_oracle(case_name, config, kernel_cases, interpreter_results):
    case = kernel_cases.CASES_BY_NAME[case_name]
    logits, u, labels = kernel_cases.make_inputs(case)
    result = interpreter_results[kernel_cases.run_id(case, LANES, config)]
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


def test_lanes_runs_cover_the_edge_cases(kernel_cases):
    """The lanes runs include several chunks per row at a non-power-of-two V, prefetch, every
    dtype, strides, in place, shift with ignored labels, the +50 spike, -inf chunks and a batch
    whose rows are all ignored (so a table change cannot silently drop one)."""
    cases = [(kernel_cases.CASES_BY_NAME[name], config) for name, config in LANES_RUNS]
    assert {case.dtype for case, _ in cases} >= {
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
    }
    assert any(config == "prefetch" for _, config in cases)
    assert any(case.vocab % 1024 and case.vocab > 8192 for case, _ in cases)
    assert any(case.layout in ("vocab_strided", "permuted") for case, _ in cases)
    assert any(case.write == "inplace" for case, _ in cases)
    assert any(case.shift and case.labels == "some_ignored" for case, _ in cases)
    assert any(case.spike for case, _ in cases)
    assert any(case.masked_vocab for case, _ in cases)
    assert any(case.labels == "all_ignored" for case, _ in cases)


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


_LANES_COMPILE_SCRIPT = """
import json
from benchmarks import ce_hvp_designs as designs
# What a launch on contiguous (B, T, V) tensors with V % 16 == 0 specialises: 16-byte aligned
# pointers, strides and V divisible by 16, unit vocabulary strides turned into constants.
ALIGNED = ("x_ptr", "u_ptr", "out_ptr", "labels_ptr", "scale_ptr", "vocab", "x_stride_b",
           "x_stride_t", "u_stride_b", "u_stride_t", "out_stride_b", "out_stride_t")
UNIT = ("x_stride_v", "u_stride_v", "out_stride_v")
def compile_lanes(dtype, block, num_warps, prefetch, contiguous):
    constexprs = dict(HAS_LABELS=True, SHIFT=True, SCALE_IN_MEMORY=dtype == "fp64",
                      X_CONTIG=contiguous, U_CONTIG=contiguous, OUT_CONTIG=contiguous,
                      ACC_FP64=dtype == "fp64", BLOCK=block, PREFETCH=prefetch)
    if contiguous:
        constexprs.update((name, 1) for name in UNIT)
    return cases.compile_for_sm90(designs._two_pass_lanes_kernel, dtype, num_warps, constexprs,
                                  ALIGNED)
results = [(*run, compile_lanes(*run)) for run in json.loads(sys.argv[2])]
print(json.dumps(results))
"""


def lanes_compile_runs() -> list[tuple[str, int, int, bool, bool]]:
    """(dtype, block, warps, prefetch, contiguous): every candidate config of two_pass_lanes at
    V = 50304 in fp32 and bf16, two of them in fp16 and fp64, and strided rows in bf16 and fp64."""
    from benchmarks import ce_hvp_designs as designs

    candidates = designs.candidate_configs(LANES, 50304)
    runs = [
        (dtype, c.block, c.num_warps, c.prefetch, True)
        for dtype in ("fp32", "bf16")
        for c in candidates
    ]
    runs += [(dtype, 8192, 16, True, True) for dtype in ("fp16", "fp64")]
    runs += [(dtype, 4096, 8, False, True) for dtype in ("fp16", "fp64")]
    runs += [(dtype, 4096, 8, True, False) for dtype in ("bf16", "fp64")]
    return list(dict.fromkeys(runs))  # 4096x8 at 2 and 4 programs per SM is one kernel


def test_lanes_compiles_for_sm90_without_spills(kernel_cases) -> None:
    """Triton's compiler (no GPU needed) accepts two_pass_lanes at every candidate config, and
    ptxas keeps the per-lane numbers in registers (no stack frame, i.e. no spills) wherever a
    thread holds at most 16 entries of a chunk in fp32, bf16 or fp16: the lanes' max, norm and
    dot add three registers per entry to the shipped kernel's tile. (Triton 3.9: 75-98 registers
    at 8192x16, 72-80 at 4096x8, 98-128 at 4096x8 with prefetch; 16384x16 spills in fp32, and
    fp64 at 16 warps, where 128 registers per thread is the limit.)"""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for")
    runs = lanes_compile_runs()
    completed = kernel_cases.compile_subprocess(
        kernel_cases.COMPILE_PRELUDE + _LANES_COMPILE_SCRIPT, json.dumps(runs), extra_path=str(ROOT)
    )
    assert completed.returncode == 0, f"compilation failed:\n{completed.stderr[-4000:]}"
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(results) == len(runs)
    for dtype, block, warps, prefetch, contiguous, usage in results:
        entries_per_thread = block // (32 * warps)
        if dtype != "fp64" and entries_per_thread <= 16:
            assert usage["STACK"] == 0, (dtype, block, warps, prefetch, contiguous, usage)
        assert 0 < usage["REG"] <= min(255, 65536 // (32 * warps)), usage


def test_benchmark_smoke(interpreter_results, kernel_cases) -> None:
    """``benchmarks/ce_hvp_variants.py --smoke`` (its ``main``, run in the interpreter process) on
    tiny shapes: every variant ran, was checked against eager, and the table lists it."""
    assert interpreter_results["smoke_rc"] == 0
    tmp_path = interpreter_results["smoke_folder"]
    report = json.loads((tmp_path / "ce_hvp_variants.json").read_text())
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        for name in ("current", *kernel_cases.DESIGN_NAMES, LANES):
            assert f"{name}_error" not in row, row[f"{name}_error"]
            check = row[f"{name}_check"]
            assert check["all_written"] and check["max_rel_err"] < 2e-2, (name, check)
            assert row[f"{name}_ms"] > 0
        for name in (*kernel_cases.DESIGN_NAMES, LANES):
            assert len(row[f"{name}_candidates_ms"]) == 2, name
    table = (tmp_path / "ce_hvp_variants.md").read_text()
    assert all(name in table for name in (*kernel_cases.DESIGN_NAMES, LANES))


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
@pytest.mark.parametrize("polls", [0, 2])
@pytest.mark.parametrize("write", ["new", "inplace"])
def test_cuda_split_kernel_claim_path(monkeypatch, polls: int, write: str, kernel_cases) -> None:
    """The split-row kernel's programs give up waiting almost at once and claim late siblings'
    chunks: races on purpose."""
    from benchmarks import ce_hvp_split as split

    monkeypatch.setattr(split, "_POLLS_BEFORE_CLAIMING", polls)
    case = kernel_cases.Case(
        f"claims_{polls}_{write}", (4, 128), 50304, torch.bfloat16, shift=True,
        write="inplace" if write == "inplace" else "out",
    )  # fmt: skip
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    for _ in range(2):
        result = run_variant(case, "current_sweep", "split", logits, u, labels)
        kernel_cases.check_against_oracle(case, result, logits, u, labels)


_SPLIT_COMPILE_SCRIPT = """
from benchmarks import ce_hvp_split
layout = dict(HAS_LABELS=True, SHIFT=True, SCALE_IN_MEMORY=True, X_CONTIG=True, U_CONTIG=True,
              OUT_CONTIG=True, BLOCK=4096)
for dtype in sys.argv[2:]:
    cases.compile_for_sm90(ce_hvp_split._ce_hvp_kernel, dtype, 4,
                           dict(ACC_FP64=dtype == "fp64", CHUNKS_POW2=16, MAX_SPIN=1, **layout))
"""


def test_split_kernel_compiles_for_a_gpu_in_every_dtype(kernel_cases) -> None:
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for")
    completed = kernel_cases.compile_subprocess(
        kernel_cases.COMPILE_PRELUDE + _SPLIT_COMPILE_SCRIPT, "fp32", "bf16", "fp16", "fp64",
        extra_path=str(ROOT),
    )  # fmt: skip
    assert completed.returncode == 0, f"compilation failed:\n{completed.stderr[-4000:]}"


@cuda_only
@pytest.mark.xfail(
    reason="split_coop (a benchmark-only design, never dispatched) writes non-finite entries on "
    "the H200 when its programs claim their siblings' segments (forced here by a poll budget of "
    "0-2; measured 2026-11-28, third session); the split kernel's own claim path passes",
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


def check_autotuned(variant: str, monkeypatch, kernel_cases) -> None:
    """Autotuned launch of a design at a real vocabulary size, in place (tuning must not touch u)."""
    from benchmarks import ce_hvp_designs as designs
    from torch_linop.kernels import _ce_hvp_two_pass as two_pass

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


@cuda_only
def test_cuda_autotuned_large_vocab(design_name: str, monkeypatch, kernel_cases) -> None:
    check_autotuned(design_name, monkeypatch, kernel_cases)


@cuda_only
def test_cuda_lanes_autotuned_large_vocab(monkeypatch, kernel_cases) -> None:
    check_autotuned(LANES, monkeypatch, kernel_cases)


# The lanes runs on a CUDA device: the interpreter's, plus the CUDA-only cases (V up to 262144,
# unaligned and permuted rows, in place, float64) at the default config.
CUDA_LANES_RUNS = [
    *LANES_RUNS,
    *((case.name, "default") for case in _case_table().CUDA_CASES),
]


@cuda_only
@pytest.mark.parametrize(
    ("case_name", "config"), CUDA_LANES_RUNS, ids=[f"{c}-{n}" for c, n in CUDA_LANES_RUNS]
)
def test_cuda_lanes_matches_oracle(case_name, config, kernel_cases, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_LINOP_CE_HVP_AUTOTUNE", "0")
    case = kernel_cases.CASES_BY_NAME[case_name]
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    result = run_variant(case, LANES, config, logits, u, labels)
    kernel_cases.check_against_oracle(case, result, logits, u, labels)
