"""The ce_hvp backend registry: which backend takes a call, and why the others do not.

On this CPU the registry must keep ``"auto"`` on the eager reference, send explicit requests to
the backend asked for, and have every backend that does not apply say why. The numbers the
chosen backend computes are checked against float64 oracles in ``test_ce_hvp.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from torch_linop.kernels import ce_hvp

registry = importlib.import_module("torch_linop.kernels._ce_hvp_registry")


def make_call(
    logits: torch.Tensor, *, requested: str = "auto", u: torch.Tensor | None = None, **overrides
):
    """A registry call on (B, T, V) logits, as ``ce_hvp`` builds it (labels None, new output)."""
    u = logits.clone() if u is None else u
    fields = dict(
        logits=logits,
        u=u,
        labels=None,
        out=None,
        ignore_index=-100,
        shift=False,
        scale=1.0,
        result_dtype=torch.promote_types(logits.dtype, u.dtype),
        requested=requested,
    )
    fields.update(overrides)
    return registry.CeHvpCall(**fields)


def names(backends) -> list[str]:
    return [backend.name for backend in backends]


def test_the_registry_lists_each_backend_once_best_first() -> None:
    assert names(registry.BACKENDS) == ["cluster", "two_pass", "compile", "eager"]
    assert registry.FAMILIES == ("auto", "triton", "compile", "eager")
    for backend in registry.BACKENDS:
        assert backend.family in registry.FAMILIES and backend.description


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("vocab", [7, 50304])
def test_auto_on_cpu_picks_eager_and_says_why_not_the_others(dtype, vocab) -> None:
    call = make_call(torch.randn(1, 2, vocab).to(dtype))
    assert names(registry.select(call)) == ["eager"]
    verdicts = {backend.name: verdict for backend, verdict in registry.explain(call)}
    assert set(verdicts) == {"cluster", "two_pass", "compile", "eager"}
    assert verdicts["eager"] and verdicts["eager"].reason == ""
    for name in ("cluster", "two_pass", "compile"):
        assert not verdicts[name] and "keeps cpu calls eager" in verdicts[name].reason


def test_explicit_requests_take_their_family() -> None:
    logits = torch.randn(1, 2, 7)
    assert names(registry.select(make_call(logits, requested="eager"))) == ["eager"]
    assert names(registry.select(make_call(logits, requested="compile"))) == ["compile"]
    explained = registry.explain(make_call(logits, requested="triton"))
    assert names(backend for backend, _ in explained) == ["cluster", "two_pass"]
    cluster_verdict = explained[0][1]
    assert not cluster_verdict and "needs CUDA tensors (got cpu)" in cluster_verdict.reason


def test_autograd_keeps_auto_on_eager_even_on_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(registry.CeHvpCall, "on_cuda", property(lambda self: True))
    logits = torch.randn(1, 2, 7, requires_grad=True)
    assert names(registry.select(make_call(logits))) == ["eager"]
    for backend, verdict in registry.explain(make_call(logits))[:-1]:
        assert not verdict and "only eager keeps a graph" in verdict.reason, backend
    with torch.no_grad():  # no graph wanted: the kernels apply again
        assert names(registry.select(make_call(logits)))[-2:] == ["compile", "eager"]
    assert registry.BACKENDS[2].applies(make_call(logits, requested="compile"))


def test_no_applicable_backend_raises_with_every_reason() -> None:
    pytest.importorskip("triton")
    from torch_linop.kernels._ce_hvp_common import is_interpreter

    if is_interpreter():
        pytest.skip("this process runs Triton's interpreter, where two_pass applies on CPU")
    call = make_call(torch.randn(1, 2, 7), requested="triton")
    with pytest.raises(ValueError, match=r"cluster: needs CUDA .*; two_pass: needs CUDA"):
        registry.select(call)


def test_cluster_reasons_name_the_condition_that_fails(monkeypatch) -> None:
    """The cluster kernel's conditions, each alone, on CPU tensors posing as an sm_90 GPU."""
    cluster_kernel = importlib.import_module("torch_linop.kernels._ce_hvp_cluster")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda *a, **k: None, raising=False)

    def reason(vocab=50304, dtype=torch.bfloat16, u_dtype=None, transpose=False):
        logits = torch.zeros(2, vocab, dtype=dtype)
        if transpose:
            logits = torch.zeros(vocab, 2, dtype=dtype).t()
        u = logits.to(u_dtype or dtype)
        return cluster_kernel.why_not(logits.unsqueeze(0), u.unsqueeze(0), None)

    assert reason() is None
    assert "V >= 16384" in reason(vocab=8000)
    assert "one dtype" in reason(dtype=torch.float64)
    assert "one dtype" in reason(u_dtype=torch.float32)
    assert "multiple of 16 bytes" in reason(vocab=50303)
    assert "does not fit" in reason(vocab=1 << 20, dtype=torch.float32)
    assert "contiguous" in reason(transpose=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "sm_80" in reason()


def test_public_entry_runs_what_the_registry_selects(monkeypatch) -> None:
    """``ce_hvp`` hands the checked call to ``dispatch`` and nothing else picks a backend."""
    seen = []
    dispatch = registry.dispatch

    def spy(call):
        seen.append(names(registry.select(call)))
        return dispatch(call)

    monkeypatch.setattr(importlib.import_module("torch_linop.kernels.ce_hvp"), "dispatch", spy)
    logits = torch.randn(3, 11, dtype=torch.float64)
    u = torch.randn(3, 11, dtype=torch.float64)
    result = ce_hvp(logits, u)
    probs = torch.softmax(logits, dim=-1)
    expected = (probs * u - probs * (probs * u).sum(-1, keepdim=True)) / 3
    torch.testing.assert_close(result, expected)
    assert seen == [["eager"]]
