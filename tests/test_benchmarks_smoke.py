"""Smoke test of the benchmark harness: every suite runs end to end on tiny float64 problems
through the real entry point, and torch-linop agrees with every installed library (and with an
independent check) on the same problem. No timing is asserted: these sizes measure nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import load_peers  # noqa: E402
from benchmarks.run import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def run_suite(suite: str, out: Path, *extra: str) -> dict[str, Any]:
    """Run ``python -m benchmarks <suite> --smoke`` in-process; return its JSON payload."""
    assert main([suite, "--smoke", "--threads", "1", "--out", str(out), *extra]) == 0
    (json_path,) = out.glob(f"{suite}-cpu-*.json")
    payload = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").read_text().count("|") > 10  # a table was written
    return payload


def installed_labels() -> set[str]:
    return {peer.label for peer in load_peers() if peer.available}


def test_matvec_agrees_with_every_library_and_an_independent_check(tmp_path: Path) -> None:
    payload = run_suite("matvec", tmp_path)
    records = payload["records"]
    assert not [r for r in records if "error" in r], "a library failed on a smoke problem"
    layer_norm_bug = payload["settings"]["torch_func_layer_norm_bug"]
    compared = set()
    for record in records:
        error = record.get("rel_error_vs_ours")
        if error is None:
            continue
        key = (record["model"], record["curvature"], record["implementation"])
        if record["implementation"] == "independent check":
            assert error < 1e-5, key  # central differences / dense first-order references
            continue
        compared.add(record.get("library"))
        known_bug = (
            layer_norm_bug
            and record.get("library") == "curvlinops"
            and record["curvature"] == "hessian"
            and record["model"] == "gpt"
        )
        if known_bug:  # curvlinops differentiates jacrev: torch.func's LayerNorm bug shows
            assert error > 1e-6, "the torch.func LayerNorm bug is gone: drop the table note"
        else:
            assert error < 1e-10, key
    installed = {p.name for p in load_peers() if p.available} - {"ours"}
    assert installed <= compared, f"never compared: {installed - compared}"
    checks = {
        (r["model"], r["curvature"]) for r in records if r["implementation"] == "independent check"
    }
    assert checks == {(m, c) for m in ("mlp", "cnn", "gpt") for c in ("hessian", "ggn", "ef")}


def test_eigs_reach_the_reference(tmp_path: Path) -> None:
    payload = run_suite("eigs", tmp_path)
    runs = {r["solver"]: r for r in payload["records"] if r.get("run", "").startswith("own")}
    assert not [r for r in payload["records"] if "error" in r and "run" not in r]
    exact_solvers = {"torch-linop lanczos", "scipy eigsh (ARPACK) on our operator"}
    exact_solvers |= installed_labels() & {"curvlinops", "hessian-eigenthings"}
    for solver in exact_solvers:
        assert runs[solver]["error"] < 1e-6, solver
        assert runs[solver]["matvecs"] > 0
    if "PyHessian" in installed_labels():  # power iteration stops on a relative change only
        assert runs["PyHessian"]["error"] < 1e-2


def test_trace_estimates_run_for_every_library(tmp_path: Path) -> None:
    payload = run_suite("trace", tmp_path)
    records = payload["records"]
    exact = records[0]["exact"]
    implementations = {(r["method"], r["implementation"]) for r in records}
    assert ("hutch++", "torch-linop") in implementations
    assert ("xtrace", "torch-linop") in implementations
    for label in installed_labels() - {"torch-linop", "torch.autograd (hand-rolled)", "BackPACK"}:
        assert ("hutchinson", label) in implementations, label
    for record in records:
        assert record["exact"] == exact
        assert abs(record["estimate"] - exact) < abs(exact)  # sane, not accurate, at budget 6
        if not (record["method"] == "xtrace" and record["budget"] % 2):
            assert record["matvecs"] == record["budget"], record


def test_slq_densities_match_the_exact_spectrum(tmp_path: Path) -> None:
    payload = run_suite("slq", tmp_path)
    results = {r["implementation"]: r for r in payload["records"]}
    assert "torch-linop" in results
    for label, record in results.items():
        assert record["w1_to_exact_over_width"] < 0.1, label
    expected = installed_labels() & {"curvlinops", "hessian-eigenthings"}
    assert expected <= set(results)
