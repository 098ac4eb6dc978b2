"""``compile_jvp=True``: the forward-mode JVPs through ``torch.compile`` give the same GGN and
empirical Fisher products as dense oracles (float64, 1e-10), cached or not; a compiler failure
warns once and the products run eagerly, with the same numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

from torch_linop import EmpiricalFisherOperator, GGNOperator
from torch_linop.reference import dense_empirical_fisher, dense_ggn

TOL = 1e-10


@pytest.mark.parametrize("cache_graph", [False, True])
def test_compiled_ggn_products_equal_the_dense_ggn(make_case, dense, rel_err, cache_graph):
    case = make_case("mlp")
    operator = GGNOperator(
        case.model, case.data, case.loss, compile_jvp=True, cache_graph=cache_graph
    )
    reference = dense_ggn(case.model, case.data, case.loss)
    vector = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(1)).double()
    for _ in range(2):
        assert rel_err(operator @ vector, reference @ vector) <= TOL
    assert rel_err(dense(operator), reference) <= TOL  # several columns: one JVP each
    compiled = operator._sandwich._compiled_jvp
    assert compiled._compiled is not None and not compiled.failed  # the compiled path ran


def test_compiled_empirical_fisher(make_case, rel_err):
    case = make_case("mlp")
    operator = EmpiricalFisherOperator(
        case.model, case.data, case.loss, compile_jvp=True, cache_graph=True
    )
    reference = dense_empirical_fisher(case.model, case.data, case.loss)
    vector = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(2)).double()
    assert rel_err(operator @ vector, reference @ vector) <= TOL
    assert not operator._sandwich._compiled_jvp.failed


def test_a_compiler_failure_warns_once_and_runs_eagerly(make_case, rel_err, monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*call_args, **call_kwargs):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    case = make_case("cnn_batchnorm_eval")
    operator = GGNOperator(case.model, case.data, case.loss, compile_jvp=True)
    reference = dense_ggn(case.model, case.data, case.loss)
    vector = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(3)).double()
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*inductor exploded"):
        first = operator @ vector
    assert rel_err(first, reference @ vector) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert rel_err(operator @ vector, reference @ vector) <= TOL
