"""ce_hvp against float64 oracles, for every backend.

The cases, inputs, oracles (explicit block-diagonal softmax Hessian for V <= 1000, double backward
through ``F.cross_entropy`` in float64 beyond) and checks are shared with the design tests:
``tests/kernels/conftest.py``. The Triton runs go through ``ce_hvp``'s dispatch (the two-pass
kernel; on Hopper GPUs the cluster kernel where it applies); cases that force a chunk config run
the two-pass kernel with it (several chunks per row at small V).

The Triton kernels run on CPU through ``TRITON_INTERPRET=1`` in one subprocess (the variable must
be set before Triton is imported); on a CUDA machine they run natively, with extra large-V cases.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from torch_linop.kernels import ce_hvp

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()


def call_ce_hvp(case, logits, u, labels, backend: str) -> torch.Tensor:
    """ce_hvp as the case asks (new tensor, NaN-poisoned out buffer, or in place into a copy of u)."""
    kwargs = dict(shift=case.shift, reduction=case.reduction, backend=backend)
    if case.write == "out":
        out = torch.full(logits.shape, float("nan"), dtype=u.dtype, device=u.device)
        result = ce_hvp(logits, u, labels, out=out, **kwargs)
        assert result is out
        return result
    if case.write == "inplace":
        buffer = u.clone()
        result = ce_hvp(logits, buffer, labels, inplace=True, **kwargs)
        assert result is buffer
        return result
    return ce_hvp(logits, u, labels, **kwargs)


def run_triton(case, logits, u, labels) -> torch.Tensor:
    """The Triton backend, with the case's forced two-pass chunk config when it has one."""
    from torch_linop.kernels import _ce_hvp_two_pass as launcher

    if case.block is None:
        return call_ce_hvp(case, logits, u, labels, "triton")
    saved_default, saved_env = launcher.default_config, os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = "0"
    launcher.default_config = lambda vocab: launcher.TwoPassConfig(*case.block)
    try:
        return call_ce_hvp(case, logits, u, labels, "triton")
    finally:
        launcher.default_config = saved_default
        if saved_env is None:
            del os.environ[AUTOTUNE_ENV]
        else:
            os.environ[AUTOTUNE_ENV] = saved_env


AUTOTUNE_ENV = "TORCH_LINOP_CE_HVP_AUTOTUNE"


@pytest.fixture(autouse=True)
def _default_triton_config(monkeypatch, request) -> None:
    """Autotuning compiles every candidate for each new signature: tests use the default config
    (except the test of tuning itself)."""
    if "tuning" not in request.node.name:
        monkeypatch.setenv(AUTOTUNE_ENV, "0")


_INTERPRETER_SCRIPT = """
results = {name: tests.run_triton(cases.CASES_BY_NAME[name], *args) for name, args in inputs.items()}
torch.save(results, results_path)
"""


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory, kernel_cases) -> dict[str, torch.Tensor]:
    """Triton outputs for every CPU case, computed in one TRITON_INTERPRET=1 subprocess."""
    inputs = {case.name: kernel_cases.make_inputs(case) for case in kernel_cases.CASES}
    folder = tmp_path_factory.mktemp("ce_hvp_interpreter")
    return kernel_cases.run_in_interpreter(_INTERPRETER_SCRIPT, __file__, folder, inputs)


def test_eager_matches_oracle(case, kernel_cases) -> None:
    logits, u, labels = kernel_cases.make_inputs(case)
    result = call_ce_hvp(case, logits, u, labels, "eager")
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


def test_triton_interpreter_matches_oracle(case, kernel_cases, interpreter_results) -> None:
    logits, u, labels = kernel_cases.make_inputs(case)
    kernel_cases.check_against_oracle(case, interpreter_results[case.name], logits, u, labels)


def test_compile_matches_oracle(kernel_cases) -> None:
    """One small shape only: the CPU compiler's warm-up costs ~15 s."""
    case = kernel_cases.CASES_BY_NAME["shift_labels"]
    logits, u, labels = kernel_cases.make_inputs(case)
    result = call_ce_hvp(case, logits, u, labels, "compile")
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


def test_dense_oracle_matches_autograd_hessian(kernel_cases) -> None:
    """The block-diagonal oracle equals torch.func.hessian of the cross-entropy (and the HVP one)."""
    case = kernel_cases.Case("oracle_check", (2, 3), 7, torch.float64, shift=True)
    logits, u, labels = kernel_cases.make_inputs(case)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            x[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )

    hessian = torch.func.hessian(loss)(logits).reshape(logits.numel(), logits.numel())
    expected = (hessian @ u.reshape(-1)).reshape(logits.shape)
    torch.testing.assert_close(kernel_cases.dense_oracle(case, logits, u, labels), expected)
    torch.testing.assert_close(kernel_cases.autograd_oracle(case, logits, u, labels), expected)


def test_auto_on_cpu_is_eager_and_differentiable(kernel_cases) -> None:
    case = kernel_cases.CASES_BY_NAME["shift_labels"]
    logits, u, labels = kernel_cases.make_inputs(case)
    logits.requires_grad_(True)
    result = ce_hvp(logits, u, labels, shift=True)
    torch.testing.assert_close(result, ce_hvp(logits, u, labels, shift=True, backend="eager"))
    result.sum().backward()  # the eager path keeps the autograd graph
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_auto_falls_back_when_a_backend_fails(monkeypatch, kernel_cases) -> None:
    """A backend that raises is reported once and skipped afterwards; an explicit request for
    a backend that failed still runs it (and raises)."""
    registry = importlib.import_module("torch_linop.kernels._ce_hvp_registry")
    calls = []

    def broken(self, call):
        calls.append(self.name)
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(registry, "failed_backends", {})
    for backend in registry.BACKENDS[:-1]:  # everything but eager applies and breaks
        monkeypatch.setattr(type(backend), "applies", lambda self, call: registry.Verdict(True))
        monkeypatch.setattr(type(backend), "run", broken)
    case = kernel_cases.CASES_BY_NAME["shift_labels"]
    logits, u, labels = kernel_cases.make_inputs(case)
    with pytest.warns(RuntimeWarning) as record:
        first = ce_hvp(logits, u, labels, shift=True, backend="auto")
    kernel_cases.check_against_oracle(case, first, logits, u, labels)
    assert calls == ["cluster", "two_pass", "compile"]  # each warned and handed on
    assert [str(warning.message).split(" failed ")[1] for warning in record] == [
        f"(RuntimeError: simulated compiler failure); falling back to {name!r} for the rest of "
        "this process"
        for name in ("two_pass", "compile", "eager")
    ]
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ce_hvp(logits, u, labels, shift=True, backend="auto")
    kernel_cases.check_against_oracle(case, result, logits, u, labels)
    assert calls == [] and set(registry.failed_backends) == {"cluster", "two_pass", "compile"}
    with pytest.raises(RuntimeError, match="simulated"):
        ce_hvp(logits, u, labels, shift=True, backend="compile")


def test_triton_backend_on_cpu_without_interpreter_says_how_to_fix() -> None:
    pytest.importorskip("triton")
    from torch_linop.kernels._ce_hvp_common import is_interpreter

    if is_interpreter():
        pytest.skip("this process runs Triton's interpreter")
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="two_pass: needs CUDA.*TRITON_INTERPRET"):
        ce_hvp(logits, logits, backend="triton")


_COMPILE_SCRIPT = """
from torch_linop.kernels import _ce_hvp_two_pass
layout = dict(HAS_LABELS=True, SHIFT=True, SCALE_IN_MEMORY=True, X_CONTIG=True, U_CONTIG=True,
              OUT_CONTIG=True, BLOCK=4096)
for dtype in sys.argv[2:]:
    fp64 = dtype == "fp64"
    for prefetch in (False, True):
        cases.compile_for_sm90(_ce_hvp_two_pass._two_pass_kernel, dtype, 8,
                               dict(ACC_FP64=fp64, PREFETCH=prefetch, **layout))
"""


def test_shipped_kernels_compile_for_a_gpu_in_every_dtype(kernel_cases) -> None:
    """Triton's compiler (it needs no GPU) accepts the shipped Triton kernel in every dtype, with
    and without prefetch. The interpreter runs the kernels as Python and cannot see what only
    the compiler rejects: the two-pass kernel's float64 path once had two ``return`` statements
    of different types and compiled nowhere, while its interpreter tests passed."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile for")
    completed = kernel_cases.compile_subprocess(
        kernel_cases.COMPILE_PRELUDE + _COMPILE_SCRIPT, "fp32", "bf16", "fp16", "fp64"
    )
    assert completed.returncode == 0, f"compilation failed:\n{completed.stderr[-4000:]}"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(u=torch.randn(3, 6)), ValueError, "same shape"),
        (dict(logits=torch.randn(5)), ValueError, r"\(N, V\) or \(B, T, V\)"),
        (dict(logits=torch.randint(0, 3, (3, 5))), TypeError, "dtype"),
        (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels has shape"),
        (dict(labels=torch.zeros(3)), TypeError, "integer dtype"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(out=torch.empty(3, 5, dtype=torch.float64)), ValueError, "out must have"),
        (dict(out=torch.empty(3, 5), inplace=True), ValueError, "either out"),
        (dict(u=torch.randn(3, 5).bfloat16(), inplace=True), TypeError, "inplace"),
        (dict(u=torch.randn(1, 5).expand(3, 5), inplace=True), ValueError, "stride-0"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    ],
)
def test_bad_inputs_raise_with_the_fix(kwargs, error, message) -> None:
    arguments = dict(logits=torch.randn(3, 5), u=torch.randn(3, 5), labels=None)
    arguments.update(kwargs)
    logits, u, labels = arguments.pop("logits"), arguments.pop("u"), arguments.pop("labels")
    with pytest.raises(error, match=message):
        ce_hvp(logits, u, labels, **arguments)


def test_out_must_not_alias_logits() -> None:
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="logits buffer"):
        ce_hvp(logits, torch.randn(3, 5), out=logits)


# ----------------------------------------------------------------------------------------------
# CUDA: the kernel natively (the tests above cover eager there too), larger V, the claim path.
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
def test_cuda_triton_matches_oracle(cuda_case, kernel_cases) -> None:
    logits, u, labels = kernel_cases.make_inputs(cuda_case, "cuda")
    result = run_triton(cuda_case, logits, u, labels)
    kernel_cases.check_against_oracle(cuda_case, result, logits, u, labels)


@cuda_only
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_cuda_backends_match_oracle(large_cuda_case, backend: str, kernel_cases) -> None:
    case = large_cuda_case
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    result = call_ce_hvp(case, logits, u, labels, backend)
    kernel_cases.check_against_oracle(case, result, logits, u, labels)


@cuda_only
def test_cuda_auto_uses_triton(kernel_cases) -> None:
    module = importlib.import_module("torch_linop.kernels._ce_hvp_registry")

    case = kernel_cases.CASES_BY_NAME["cuda_v50304_bf16_shift"]
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    result = ce_hvp(logits, u, labels, shift=True)
    assert not module.failed_backends, module.failed_backends
    torch.testing.assert_close(result, run_triton(case, logits, u, labels), rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize(
    ("dtype", "launcher_name"),
    [
        (torch.bfloat16, "_ce_hvp_cluster"),
        (torch.bfloat16, "_ce_hvp_two_pass"),
        (torch.float64, "_ce_hvp_two_pass"),
    ],
)
def test_cuda_inplace_tuning_leaves_u_intact(
    monkeypatch, dtype: torch.dtype, launcher_name: str, kernel_cases
) -> None:
    """The first in-place call autotunes the kernel ce_hvp runs for the dtype; tuning must not
    write into u. (On Hopper the cluster kernel takes bf16 rows of 32768; the two-pass kernel
    runs them with the cluster kernel switched off, and float64 always; elsewhere the cluster case
    is skipped.)"""
    dispatch = importlib.import_module("torch_linop.kernels._ce_hvp_registry")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    if launcher_name == "_ce_hvp_cluster" and not hopper:
        pytest.skip("the cluster kernel needs an sm_90 GPU")
    if launcher_name == "_ce_hvp_two_pass" and dtype != torch.float64:
        monkeypatch.setenv(dispatch.CLUSTER_ENV, "0")
    launcher = importlib.import_module(f"torch_linop.kernels.{launcher_name}")
    monkeypatch.setattr(launcher, "_tuned", {})
    case = kernel_cases.Case(
        f"inplace_tuning_{dtype}", (8, 512), 32768, dtype, shift=True, write="inplace"
    )
    logits, u, labels = kernel_cases.make_inputs(case, "cuda")
    result = run_triton(case, logits, u, labels)
    kernel_cases.check_against_oracle(case, result, logits, u, labels)
    assert launcher._tuned, "the call should have autotuned"


def test_fastest_config_times_every_candidate_and_never_writes_u() -> None:
    """The tuners' shared core (CPU: wall-clock medians): the fastest candidate wins, a failing
    one is reported and skipped, in place mode times into a scratch buffer, none ran raises."""
    import time as time_module

    from torch_linop.kernels._ce_hvp_common import fastest_config

    def launch(logits, u, labels, out, *, config):
        if config == "broken":
            raise RuntimeError("out of shared memory")
        time_module.sleep(config)
        out.fill_(config)

    logits = torch.randn(2, 3, 5)
    u = torch.randn(2, 3, 5)
    u_before = u.clone()
    failed: dict = {}
    best, timings = fastest_config(
        launch, [0.02, 0.0, "broken"], logits, u, None, u, tune_rows=None,
        kernel_name="test kernel", failed=failed,
    )  # fmt: skip
    assert best == 0.0 and set(timings) == {0.02, 0.0}
    assert "out of shared memory" in failed["broken"]
    assert torch.equal(u, u_before)  # out aliased u: tuning wrote elsewhere
    with pytest.raises(RuntimeError, match="ce_hvp test kernel: no candidate config ran"):
        fastest_config(launch, ["broken"], logits, u, None, u.clone(), tune_rows=None,
                       kernel_name="test kernel")  # fmt: skip
