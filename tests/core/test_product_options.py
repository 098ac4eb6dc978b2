"""``options=ProductOptions(...)``: the grouped options give the products the old keywords gave
(checked against dense float64 matrices), the old keywords warn once with the new spelling,
mixing both is refused, and each public constructor shows at most 9 parameters."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    ProductOptions,
    supervised_forward,
    supervised_loss_of_output,
)
from torch_linop.losses import SplitLoss
from torch_linop.reference import dense_empirical_fisher, dense_ggn, dense_hessian

OPERATORS = [HessianOperator, GGNOperator, EmpiricalFisherOperator, MCFisherOperator]
DENSE = {
    HessianOperator: dense_hessian,
    GGNOperator: dense_ggn,
    EmpiricalFisherOperator: dense_empirical_fisher,
}


def probes(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(size, 3, generator=generator, dtype=torch.float64)


def built_quietly(cls, *args, **kwargs):
    """The operator, and the deprecation warnings its construction raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        operator = cls(*args, **kwargs)
    return operator, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda cls: cls.__name__)
def test_options_give_the_products_of_the_old_keywords(cls, make_case):
    """The first of two batches (num_batches=1), its mean taken over twice its samples
    (num_data), and a batch_size_fn counting samples: the options change the matrix, and both
    spellings give it exactly; against the dense float64 matrix of the first batch, halved."""
    case = make_case("mlp")
    first_batch_size = int(case.data[0][0].shape[0])
    settings = dict(
        num_batches=1,
        num_data=2 * first_batch_size,
        batch_size_fn=lambda batch: batch[0].shape[0],
    )
    new, new_warnings = built_quietly(
        cls, case.model, case.data, case.loss, options=ProductOptions(**settings)
    )
    old, old_warnings = built_quietly(cls, case.model, case.data, case.loss, **settings)
    assert not new_warnings and len(old_warnings) == 1
    columns = probes(new.shape[0])
    assert torch.equal(new @ columns, old @ columns)
    if cls in DENSE:
        expected = 0.5 * DENSE[cls](case.model, case.data[:1], case.loss)
        torch.testing.assert_close(new @ columns, expected @ columns, rtol=1e-10, atol=1e-12)
    else:  # the MC Fisher on the first batch alone, halved (same seed: the same targets)
        alone = cls(case.model, case.data[:1], case.loss)
        torch.testing.assert_close(new @ columns, 0.5 * (alone @ columns), rtol=1e-12, atol=0)


def test_an_old_keyword_warns_once_with_the_new_spelling(make_case):
    case = make_case("mlp")
    operator, caught = built_quietly(
        GGNOperator, case.model, case.data, case.loss, num_batches=1, check_deterministic=True
    )
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "options=ProductOptions(num_batches=1, check_deterministic=True)" in message, message
    assert caught[0].filename == __file__  # points at the caller's line, not the library
    assert operator.options == ProductOptions(num_batches=1, check_deterministic=True)


def test_old_keywords_together_with_options_are_refused(make_case):
    case = make_case("mlp")
    with pytest.raises(TypeError, match="pass them inside options only"):
        HessianOperator(
            case.model, case.data, case.loss, num_data=8, options=ProductOptions(num_batches=1)
        )
    with pytest.raises(TypeError, match="options must be a torch_linop.ProductOptions"):
        HessianOperator(case.model, case.data, case.loss, options={"num_batches": 1})


def test_the_mc_fisher_takes_a_split_loss_as_one_object(make_case):
    """The 4th positional argument of earlier versions warns and builds the same matrix as
    ``SplitLoss(forward_fn, loss_of_output_fn)``."""
    case = make_case("mlp")
    criterion = supervised_loss_of_output(torch.nn.functional.cross_entropy)
    split = MCFisherOperator(case.model, case.data, SplitLoss(supervised_forward, criterion))
    old, caught = built_quietly(
        MCFisherOperator, case.model, case.data, supervised_forward, criterion
    )
    assert len(caught) == 1 and "SplitLoss(forward_fn, loss_of_output_fn)" in str(caught[0].message)
    columns = probes(split.shape[0])
    assert torch.equal(split @ columns, old @ columns)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda cls: cls.__name__)
def test_constructors_show_at_most_nine_parameters(cls):
    parameters = inspect.signature(cls).parameters
    assert len(parameters) <= 9, list(parameters)
    assert "options" in parameters and parameters["options"].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
