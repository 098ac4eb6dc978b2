"""The Hopper cluster kernel of ``ce_hvp`` (``kernels/_ce_hvp_cluster.py``).

CPU: which calls it takes, its cluster sizes, its CUDA source compiled for sm_90 by nvcc (when
nvcc is on the PATH; NVRTC compiles the same source at run time), and the registry's fallback to
the two-pass kernel when it fails. GPU (sm_90): its products against a float64 oracle computed here from the
definition, through ``ce_hvp``'s dispatch, in a CUDA graph, and the calls it must leave to Triton.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from torch_linop.kernels import _ce_hvp_cluster as cluster_kernel
from torch_linop.kernels import ce_hvp

registry = importlib.import_module("torch_linop.kernels._ce_hvp_registry")

IGNORE = -100
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


def target_rows(shape, labels=None, shift=False, device="cpu"):
    """Which rows have a target (``F.cross_entropy``'s convention, HF's shift)."""
    has_target = torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        targets = labels[..., 1:] if shift else labels
        has_target[..., : targets.shape[-1]] = targets != IGNORE
    if shift:
        has_target[..., -1] = False
    return has_target


def oracle(logits, u, labels=None, shift=False):
    """``(p * u - p <p, u>) / n_valid`` per row with a target, in float64, from the definition."""
    x, w = logits.double(), u.double()
    p = torch.softmax(x, dim=-1)
    product = p * w - p * (p * w).sum(-1, keepdim=True)
    has_target = target_rows(x.shape[:-1], labels, shift, x.device)
    return product * has_target.unsqueeze(-1) / max(int(has_target.sum()), 1)


def test_candidate_clusters_hold_a_row_in_shared_memory():
    assert cluster_kernel.candidate_clusters(50304, 4) == [2, 4]
    assert cluster_kernel.candidate_clusters(50304, 2) == [2, 4]
    assert cluster_kernel.candidate_clusters(128256, 2) == [4, 8]
    assert cluster_kernel.candidate_clusters(128256, 4) == [8]
    assert cluster_kernel.candidate_clusters(262144, 4) == []  # 2 MB rows: Triton's
    assert cluster_kernel.candidate_configs(128256, 4) == [(8, 256), (8, 512)]
    for vocab, size in ((50304, 4), (128256, 2), (128256, 4), (262144, 2)):
        for cluster in cluster_kernel.candidate_clusters(vocab, size):
            segment_bytes = 2 * 16 * cluster_kernel.segment_vectors(vocab, size, cluster)
            assert segment_bytes * cluster >= 2 * vocab * size  # the row is covered
            assert segment_bytes <= 225 * 1024  # and fits a CTA's shared memory


def test_it_takes_no_call_off_hopper():
    logits = torch.randn(2, 3, 50304)
    assert "needs CUDA" in cluster_kernel.why_not(logits, logits.clone(), logits.clone())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (NVRTC compiles it on a GPU)")
@pytest.mark.parametrize(
    "dtype, cluster",
    [(torch.float32, 2), (torch.float32, 8), (torch.bfloat16, 8), (torch.float16, 4)],
)
def test_source_compiles_for_sm90_without_spills(tmp_path, dtype, cluster):
    """Registers decide how many 512-thread CTAs share an SM (measured: more is faster at
    V=128256); at most 64 keeps two."""
    source = tmp_path / "kernel.cu"
    source.write_text(cluster_kernel.kernel_source(dtype, cluster))
    completed = subprocess.run(
        ["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = completed.stderr
    assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, report
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert registers <= 64, report


def call_of(logits, *, ignore_index=IGNORE, requested="triton"):
    """A registry call on (B, T, V) logits with u = logits (labels None, new output)."""
    return registry.CeHvpCall(
        logits=logits, u=logits, labels=None, out=None, ignore_index=ignore_index, shift=False,
        scale=1.0, result_dtype=logits.dtype, requested=requested,
    )  # fmt: skip


def test_a_failing_cluster_kernel_warns_once_and_leaves_calls_to_triton(monkeypatch):
    """Where the cluster kernel applies but fails (NVRTC missing, a launch refused), the call
    goes to the two-pass kernel with one warning, and later calls go there without trying."""
    calls = []

    def failing(self, call):
        calls.append(1)
        raise RuntimeError("nvrtc: library not found")

    cluster, two_pass = registry.BACKENDS[:2]
    monkeypatch.setattr(registry, "failed_backends", {})
    monkeypatch.setattr(cluster_kernel, "why_not", lambda *args: None)
    monkeypatch.setattr(type(cluster), "run", failing)
    monkeypatch.setattr(type(two_pass), "applies", lambda self, call: registry.Verdict(True))
    monkeypatch.setattr(type(two_pass), "run", lambda self, call: call.logits.double())
    monkeypatch.setattr(registry.CeHvpCall, "on_cuda", property(lambda self: True))  # as on a GPU
    logits = torch.randn(1, 2, 8)
    with pytest.warns(RuntimeWarning, match="Hopper cluster kernel failed.*nvrtc"):
        assert registry.dispatch(call_of(logits)).dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.dispatch(call_of(logits)).dtype == torch.float64
    assert len(calls) == 1  # not retried
    assert [b.name for b in registry.select(call_of(logits))] == ["two_pass"]
    monkeypatch.setattr(registry, "failed_backends", {})
    assert [b.name for b in registry.select(call_of(logits))] == ["cluster", "two_pass"]
    monkeypatch.setenv(registry.CLUSTER_ENV, "0")
    verdict = cluster.applies(call_of(logits))
    assert not verdict and registry.CLUSTER_ENV in verdict.reason  # switched off: not tried


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs an sm_90 (Hopper) GPU",
)


@pytest.fixture
def cluster_calls(monkeypatch):
    """Counts the cluster kernel's launches (a spy around ``launch``)."""
    calls = []
    launch = cluster_kernel.launch

    def spy(*args, **kwargs):
        calls.append(kwargs["config"])  # (cluster size, threads)
        return launch(*args, **kwargs)

    monkeypatch.setattr(cluster_kernel, "launch", spy)
    return calls


CUDA_CASES = [
    # (dtype, (B, T), V, labels, shift, in place, cluster)
    (torch.float32, (3, 40), 50304, True, True, False, None),
    (torch.float32, (2, 33), 50304, False, False, True, 4),
    (torch.bfloat16, (4, 64), 50304, True, False, False, 2),
    (torch.bfloat16, (2, 50), 128256, True, True, True, 8),
    (torch.float16, (2, 30), 128256, False, True, False, 4),
    (torch.float32, (2, 30), 128256, True, False, False, 8),
    (torch.bfloat16, (1, 7), 16384, False, False, False, None),
]


@needs_hopper
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3:7]}")
def test_cuda_matches_the_oracle(case, cluster_calls):
    dtype, rows, vocab, with_labels, shift, in_place, cluster = case
    generator = torch.Generator(device="cuda").manual_seed(vocab + rows[1])
    logits = (3 * torch.randn(*rows, vocab, device="cuda", generator=generator)).to(dtype)
    logits[0, 0, vocab // 3] = 50.0  # a spike stays finite
    u = torch.randn(*rows, vocab, device="cuda", generator=generator).to(dtype)
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab, rows, device="cuda", generator=generator)
        labels[:, ::3] = IGNORE
    expected = oracle(logits, u, labels, shift)
    if cluster is None:  # through the public dispatch
        out = u.clone() if in_place else torch.full_like(logits, float("nan"))
        result = ce_hvp(logits, out if in_place else u, labels, shift=shift, backend="triton",
                        inplace=in_place, out=None if in_place else out)  # fmt: skip
    else:
        out = u.clone() if in_place else torch.full_like(logits, float("nan"))
        valid = int(target_rows(rows, labels, shift, "cuda").sum())
        cluster_kernel.ce_hvp_cluster(
            logits, out if in_place else u, labels, out, ignore_index=IGNORE, shift=shift,
            scale=1.0 / max(valid, 1), cluster=cluster, threads=256 if cluster == 8 else 512,
        )  # fmt: skip
        result = out
    assert cluster_calls, "the cluster kernel did not take the call"
    assert torch.isfinite(result).all()
    masked = expected.abs().sum(-1) == 0
    assert (result[masked] == 0).all()  # rows without a target: exact zeros
    error = float((result.double() - expected).norm() / expected.norm())
    assert error <= TOLERANCE[dtype], error


@needs_hopper
def test_cuda_leaves_unaligned_rows_to_triton(cluster_calls):
    logits = torch.randn(2, 9, 50257, device="cuda")  # 50257 * 4 bytes: rows not 16-byte aligned
    u = torch.randn_like(logits)
    result = ce_hvp(logits, u, backend="triton")
    assert not cluster_calls
    expected = oracle(logits, u)
    assert float((result.double() - expected).norm() / expected.norm()) < 1e-5


@needs_hopper
def test_cuda_replays_in_a_cuda_graph(cluster_calls):
    logits = torch.randn(4, 16, 50304, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(logits)
    out = torch.empty_like(logits)
    ce_hvp(logits, u, backend="triton", out=out)  # compiled and tuned outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ce_hvp(logits, u, backend="triton", out=out)
    u.copy_(torch.randn_like(u))
    graph.replay()
    torch.cuda.synchronize()
    expected = oracle(logits, u)
    assert float((out.double() - expected).norm() / expected.norm()) < 1.5e-2
    assert len(cluster_calls) >= 2


def test_an_ignore_index_beyond_32_bits_stays_on_triton(monkeypatch):
    monkeypatch.setattr(cluster_kernel, "why_not", lambda *args: None)
    monkeypatch.setattr(registry.CeHvpCall, "on_cuda", property(lambda self: True))
    cluster = registry.BACKENDS[0]
    logits = torch.randn(1, 2, 8)
    assert cluster.applies(call_of(logits, ignore_index=-(2**31)))
    verdict = cluster.applies(call_of(logits, ignore_index=-(2**40)))
    assert not verdict and "32-bit ignore_index" in verdict.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message off Hopper")
def test_the_sweep_benchmark_says_what_it_needs(capsys):
    import runpy

    module = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "ce_hvp_cluster.py"))
    assert module["main"]([]) == 2
    assert "needs an sm_90" in capsys.readouterr().err
