"""The ce_hvp kernel tests' one case table, their inputs, float64 oracles and checks.

``test_ce_hvp.py`` (the public ``ce_hvp`` on every backend) and ``test_ce_hvp_variants.py`` (the
Triton designs with forced configs) draw their cases from ``CASES`` below. The suite runs with
``--import-mode=importlib``, so test files cannot import this module: they get the cases through
the parametrized fixtures at the end (``case``, ``cuda_case``, ``large_cuda_case``,
``design_run``) and the helpers through the ``kernel_cases`` fixture (this module). The Triton
interpreter subprocesses load this file by its path.

Oracles: the explicit softmax Hessian (diag(p) - p p^T, one V x V block per row with a target) for
V <= 1000, and the double-backward Hessian-vector product of ``F.cross_entropy`` in float64 for
larger V (both checked against ``torch.func.hessian`` in ``test_ce_hvp.py``). Half-precision
inputs are compared with the oracle evaluated on the same rounded inputs.
"""

from __future__ import annotations

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
    layout: str = "contiguous"  # "contiguous" | "vocab_strided" | "permuted" | "padded_rows"
    spike: bool = False
    masked_vocab: int = 0  # logits[..., :masked_vocab] = -inf (whole chunks of zero probability)
    write: str = "new"  # "new" | "out" (NaN-poisoned buffer) | "inplace" (into a copy of u)
    # test_ce_hvp.py: run the two-pass kernel with this (chunk, warps) config (several chunks
    # per row at small V)
    block: tuple[int, int] | None = None
    # design tests (test_ce_hvp_variants.py): the configs to run this case with, see DESIGN_RUNS
    design_configs: tuple[str, ...] = ()


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SPLIT_AND_DEFAULT = ("split", "default")

CASES = [
    *[
        Case(
            f"v{vocab}_{DTYPE_NAMES[dtype]}",
            rows,
            vocab,
            dtype,
            design_configs=("split", "prefetch")
            if vocab >= 1000 and dtype != torch.float16
            else ("split",),
        )
        for vocab, rows in ((7, (2, 3)), (100, (2, 3)), (1000, (2, 3)), (5000, (1, 3)))
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ],
    Case("v5000_default", (1, 3), 5000, shift=True, design_configs=("default",)),
    Case("v1000_tile_bf16", (2, 3), 1000, torch.bfloat16, design_configs=("tile",)),
    Case("shift_labels", (2, 5), 100, shift=True, design_configs=("split", "tile")),
    Case("shift_no_labels", (3, 4), 100, labels="none", shift=True, design_configs=("split",)),
    Case("no_labels_2d", (11,), 100, labels="none", design_configs=("split",)),
    Case("shift_2d_one_sequence", (6,), 100, shift=True),
    Case("odd_rows_shift", (1, 13), 1000, shift=True, design_configs=("prefetch",)),
    Case("sum_reduction", (2, 3), 100, shift=True, reduction="sum", design_configs=("split",)),
    Case(
        "all_ignored",
        (2, 3),
        100,
        labels="all_ignored",
        design_configs=("split", "default", "tile"),
    ),
    Case("shift_single_step", (3, 1), 100, labels="none", shift=True),
    Case("spike_fp32", (1, 3), 1000, spike=True, design_configs=SPLIT_AND_DEFAULT),
    Case("spike_bf16", (1, 3), 1000, torch.bfloat16, spike=True, design_configs=("split", "tile")),
    Case(
        "vocab_strided_shift",
        (2, 3),
        1000,
        layout="vocab_strided",
        shift=True,
        design_configs=("split", "default", "prefetch"),
    ),
    Case("permuted_batch_time", (2, 3), 100, layout="permuted", shift=True),
    Case(
        "permuted_bf16",
        (2, 3),
        100,
        torch.bfloat16,
        layout="permuted",
        shift=True,
        design_configs=SPLIT_AND_DEFAULT,
    ),
    Case("padded_rows_unaligned", (2, 3), 100, torch.bfloat16, layout="padded_rows"),
    Case("odd_rows_multi_chunk", (37,), 100, block=(32, 1)),
    Case("multi_chunk_shift_bf16", (2, 3), 1000, torch.bfloat16, shift=True, block=(128, 1)),
    Case("multi_chunk_strided", (2, 3), 1000, layout="vocab_strided", block=(256, 2)),
    Case(
        "masked_vocab",
        (2, 3),
        1000,
        shift=True,
        masked_vocab=300,
        block=(128, 1),
        design_configs=("prefetch", "tile"),
    ),
    Case(
        "fp64_no_labels",
        (2, 3),
        100,
        torch.float64,
        labels="none",
        design_configs=SPLIT_AND_DEFAULT,
    ),
    Case(
        "fp64_shift",
        (2, 3),
        1000,
        torch.float64,
        shift=True,
        design_configs=("split", "prefetch"),
    ),
    Case(
        "bf16_logits_fp32_u",
        (2, 3),
        100,
        torch.bfloat16,
        u_dtype=torch.float32,
        design_configs=SPLIT_AND_DEFAULT,
    ),
    Case("out_buffer", (2, 3), 1000, shift=True, write="out"),
    Case(
        "inplace_shift",
        (2, 3),
        1000,
        shift=True,
        write="inplace",
        block=(128, 1),
        design_configs=("prefetch", "tile"),
    ),
    Case(
        "inplace_bf16", (2, 3), 1000, torch.bfloat16, write="inplace", design_configs=("default",)
    ),
    Case("v50257_fp32", (1, 2), 50257),
    Case("v50257_bf16", (1, 2), 50257, torch.bfloat16, shift=True, labels="none"),
    Case("v130000_fp32", (2,), 130000),
    Case("v130000_bf16", (1, 3), 130000, torch.bfloat16, shift=True),
]
# Larger cases for a CUDA device only (the interpreter would take minutes).
CUDA_CASES = [
    Case("cuda_v50304_bf16_shift", (4, 64), 50304, torch.bfloat16, shift=True),
    Case("cuda_v128256_fp32", (2, 48), 128256, layout="padded_rows"),
    Case("cuda_v200000_fp16", (96,), 200000, torch.float16),
    Case("cuda_v262144_bf16_inplace", (2, 40), 262144, torch.bfloat16, shift=True, write="inplace"),
    Case("cuda_v262144_fp32_strided", (3, 8), 262144, layout="permuted"),
    Case("cuda_v1000_many_rows", (4097,), 1000, torch.bfloat16),
    Case("cuda_fp64_v32000", (2, 16), 32000, torch.float64, shift=True),
]
CASES_BY_NAME = {case.name: case for case in CASES + CUDA_CASES}

# The design tests' configs (see test_ce_hvp_variants.variant_config) and the designs each runs.
DESIGN_NAMES = ("two_pass", "split_coop", "split_two_kernel", "current_sweep")
DESIGNS_BY_CONFIG = {
    "split": DESIGN_NAMES,
    "default": DESIGN_NAMES,
    "prefetch": ("two_pass", "split_coop", "split_two_kernel"),
    "tile": ("split_coop",),
}
DESIGN_RUNS = [
    (case, design, config)
    for case in CASES
    for config in case.design_configs
    for design in DESIGNS_BY_CONFIG[config]
]


def run_id(case: Case, design: str, config: str) -> str:
    return f"{case.name}-{design}-{config}"


def make_inputs(
    case: Case, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits, tangent and labels for a case; drawn on CPU from the case's seed, laid out on device."""
    generator = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    rows, vocab = case.rows, case.vocab

    def draw(dtype: torch.dtype, spread: float) -> torch.Tensor:
        if case.layout == "vocab_strided":  # stride of the vocab axis is the number of rows
            base = torch.randn(vocab, *rows, generator=generator) * spread
            return base.to(dtype).to(device).permute(*range(1, len(rows) + 1), 0)
        if case.layout == "permuted":  # (T, B, V) memory viewed as (B, T, V)
            base = torch.randn(*reversed(rows), vocab, generator=generator) * spread
            return base.to(dtype).to(device).transpose(0, 1)
        if case.layout == "padded_rows":  # row stride V + 5: rows not 16-byte aligned
            base = torch.randn(*rows, vocab + 5, generator=generator) * spread
            return base.to(dtype).to(device)[..., :vocab]
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
        flat[1 :: max(2, flat.numel() // 3)] = IGNORE  # ignore some rows, keep others
    return logits, u, labels.to(device)


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
    """The softmax Hessian in float64, one explicit (V x V) block per row with a target, times u."""
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
    """Double-backward HVP of F.cross_entropy (HF causal-LM shift) in float64, on logits' device."""
    batch_first = logits.reshape(-1, *logits.shape[-2:]) if len(case.rows) == 1 else logits
    x = batch_first.detach().double().requires_grad_(True)
    tangent = u.double().reshape(x.shape)
    if labels is None:
        targets = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    else:
        targets = labels.reshape(x.shape[:-1])
    if case.shift:
        x_scored, targets = x[:, :-1], targets[:, 1:]
    else:
        x_scored = x
    if targets.numel() == 0 or bool((targets == IGNORE).all()):
        return torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    loss = F.cross_entropy(
        x_scored.reshape(-1, case.vocab),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction=case.reduction,
    )
    (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
    (product,) = torch.autograd.grad((gradient * tangent).sum(), x)
    return product.reshape(logits.shape)


def oracle(case: Case, logits, u, labels) -> torch.Tensor:
    if case.vocab <= 1000 and logits.numel() <= 6000:
        return dense_oracle(case, logits, u, labels)
    return autograd_oracle(case, logits, u, labels)


def tolerance(case: Case) -> float:
    """Relative L2 error allowed: output rounding for half types, summation error for fp32."""
    dtypes = {case.dtype, case.u_dtype or case.dtype}
    if torch.float64 in dtypes:
        return 1e-12
    if torch.bfloat16 in dtypes and case.u_dtype != torch.float32:
        return 1.2e-2  # 8-bit mantissa; the interpreter truncates fp32 -> bf16 instead of rounding
    if torch.float16 in dtypes:
        return 2e-3
    return 5e-6 + 2e-10 * case.vocab  # eager fp32 softmax sums serially on CPU


def check_against_oracle(case: Case, result: torch.Tensor, logits, u, labels) -> None:
    """Shape, dtype, every entry written, exact zeros without a target, and the error against the
    float64 oracle, overall and row by row."""
    expected = oracle(case, logits, u, labels).to(result.device)
    assert result.shape == logits.shape
    assert result.dtype == torch.promote_types(logits.dtype, u.dtype)
    assert torch.isfinite(result).all(), "non-finite entries (unwritten NaN poison or overflow)"
    mask = rows_with_target(case, labels).reshape(logits.shape[:-1]).to(result.device)
    assert torch.equal(result[~mask], torch.zeros_like(result[~mask])), "rows without target"
    if not mask.any():
        return
    diff = (result.double() - expected)[mask]
    # The error of the best answer representable in the result dtype (fp16 results of large-V
    # rows are subnormal) is allowed on top.
    unavoidable = (expected.to(result.dtype).double() - expected)[mask]
    relative = ((diff.norm() - 2 * unavoidable.norm()) / expected[mask].norm()).item()
    assert relative < tolerance(case), f"relative error {relative:.2e}"
    # Per row, against the forward-error scale of p * (u - <p, u>), i.e. |p| * (|u| + max |u|): a
    # plain relative error is meaningless on a near-one-hot row (the +50 spike), whose product ~ 0.
    scale = 1.0 / int(mask.sum()) if case.reduction == "mean" else 1.0
    probs = torch.softmax(logits.double(), dim=-1).to(result.device)[mask]
    u_abs = u.double().abs().to(result.device)[mask]
    error_scale = scale * (probs * (u_abs + u_abs.amax(-1, keepdim=True))).norm(dim=-1)
    row_excess = diff.norm(dim=-1) - 2 * unavoidable.norm(dim=-1)
    worst_row = (row_excess / error_scale).max().item()
    assert worst_row < tolerance(case), f"worst row error {worst_row:.2e}"


# ----------------------------------------------------------------------------------------------
# Triton's compiler for sm_90 (no GPU needed), run in a subprocess without TRITON_INTERPRET: the
# shipped kernels' and the unshipped designs' compile tests load this file by its path.


def compile_for_sm90(
    kernel, dtype: str, num_warps: int, constexprs: dict, aligned: tuple[str, ...] = ()
) -> dict[str, int]:
    """Compile a ce_hvp Triton kernel for sm_90 with these constexprs (``aligned`` arguments
    marked 16-divisible, as a launch on aligned tensors specialises them); its registers and
    stack bytes per thread (``REG``, ``STACK``) as cuobjdump reports them, or {} without it."""
    import inspect
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in ("x_ptr", "u_ptr", "out_ptr"):
            return "*" + dtype
        if name in ("scale_ptr", "stats_ptr"):
            return "*fp64" if dtype == "fp64" else "*fp32"
        pointers = {"labels_ptr": "*i64", "claim_ptr": "*i32", "count_ptr": "*i32"}
        return pointers.get(name, "fp32" if name == "scale_value" else "i32")

    constants = {(names.index(name),): value for name, value in constexprs.items()}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(kernel, {name: kind(name) for name in names}, constexprs=constants,
                       attrs=attrs)  # fmt: skip
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)
    )
    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # an older Triton: compiled, usage unknown
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {key: int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK")}


def compile_subprocess(script: str, *args: str, extra_path: str | None = None):
    """Run ``script`` (which finds this file as ``sys.argv[1]``) with Triton's compiler, not its
    interpreter; ``extra_path`` goes on PYTHONPATH."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).resolve()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


COMPILE_PRELUDE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("ce_hvp_cases", sys.argv[1])
cases = sys.modules["ce_hvp_cases"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
"""


# ----------------------------------------------------------------------------------------------
# Triton's interpreter: one subprocess per test file (one Triton import under TRITON_INTERPRET=1).

_INTERPRETER_PRELUDE = """
import importlib.util, sys, torch
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
cases, tests = load("ce_hvp_cases", sys.argv[1]), load("ce_hvp_interpreter_tests", sys.argv[2])
inputs, results_path = torch.load(sys.argv[3]), sys.argv[4]
"""


def run_in_interpreter(
    script: str, test_file: str, folder: Path, inputs: dict, *args: str, **env: str
) -> dict:
    """Run ``script`` under TRITON_INTERPRET=1 and return the dict it saves to ``results_path``.

    The script sees ``cases`` (this module), ``tests`` (the module at ``test_file``), ``inputs``
    (saved and reloaded) and ``args`` as ``sys.argv[5:]``; ``env`` is added to the environment.
    """
    pytest.importorskip("triton")
    inputs_path, results_path = folder / "inputs.pt", folder / "results.pt"
    torch.save(inputs, inputs_path)
    completed = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_PRELUDE + script, __file__, test_file]
        + [str(inputs_path), str(results_path), *args],
        env=dict(os.environ, TRITON_INTERPRET="1", **env),
        capture_output=True,
        text=True,
        timeout=240,
    )
    if "only 0-dimensional arrays can be converted" in completed.stderr:
        # Triton < 3.7's interpreter hands out program ids as 1-element arrays, which numpy
        # >= 2.4 refuses to convert to ints: an environment limit (the GPU image's Triton 3.6),
        # not a kernel bug. The test extra installs a Triton whose interpreter works.
        pytest.skip("this Triton's interpreter does not work with this numpy")
    assert completed.returncode == 0, f"interpreter run failed:\n{completed.stderr[-4000:]}"
    return torch.load(results_path)


# ----------------------------------------------------------------------------------------------
# Fixtures: the table as test parameters, and this module as the helpers' namespace.


@pytest.fixture(scope="session")
def kernel_cases():
    """This module: ``Case``, the tables, ``make_inputs``, the oracles, ``check_against_oracle``."""
    return sys.modules[__name__]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    """Every case that also runs on CPU (eager, and Triton's interpreter)."""
    return request.param


@pytest.fixture(params=CASES + CUDA_CASES, ids=lambda case: case.name)
def cuda_case(request) -> Case:
    """Every case, for the CUDA runs of the Triton backend."""
    return request.param


@pytest.fixture(params=CUDA_CASES, ids=lambda case: case.name)
def large_cuda_case(request) -> Case:
    """The CUDA-only cases, for the other backends on CUDA."""
    return request.param


@pytest.fixture(params=DESIGN_RUNS, ids=[run_id(*run) for run in DESIGN_RUNS])
def design_run(request) -> tuple[Case, str, str]:
    """(case, design, config name) of every design test run."""
    return request.param


@pytest.fixture(params=DESIGN_NAMES)
def design_name(request) -> str:
    return request.param
