"""Parameter selection (filters, frozen parameters) and data handling (dict batches, HF-style
``BatchEncoding`` batches, ``batch_size_fn``, ``num_batches``): each against a sub-block or a
re-weighting of an independently built dense matrix."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LossFunction,
    match_names,
    match_regex,
    parameters_to_vector,
    vector_to_parameters,
)
from torch_linop.params import join_tensors, split_vector
from torch_linop.reference import dense_ggn, dense_hessian

DTYPE = torch.float64


def _index_of(model, selected_names):
    """Positions of the selected parameters' entries in the full flat parameter vector."""
    index, start = [], 0
    for name, param in model.named_parameters():
        if name in selected_names:
            index.extend(range(start, start + param.numel()))
        start += param.numel()
    return torch.tensor(index)


@pytest.mark.parametrize(
    "param_filter, names",
    [
        (match_names("0.*"), ["0.weight", "0.bias"]),
        (match_names("*.bias"), ["0.bias", "2.bias"]),
        (match_regex(r"^2\."), ["2.weight", "2.bias"]),
        (match_regex(r"weight$", r"^0\.bias$"), ["0.weight", "0.bias", "2.weight"]),
        (lambda name, param: param.dim() == 1, ["0.bias", "2.bias"]),
    ],
)
def test_param_filter_selects_a_sub_block(make_case, param_filter, names, dense, rel_err):
    case = make_case("mlp")
    full = dense_hessian(case.model, case.data, case.loss)
    operator = HessianOperator(case.model, case.data, case.loss, param_filter=param_filter)
    assert list(operator.params) == names  # named_parameters() order
    index = _index_of(case.model, names)
    assert operator.shape == (len(index), len(index))
    assert rel_err(dense(operator), full[index][:, index]) <= 1e-12
    ggn = GGNOperator(case.model, case.data, case.loss, param_filter=param_filter)
    full_ggn = dense_ggn(case.model, case.data, case.loss)
    assert rel_err(dense(ggn), full_ggn[index][:, index]) <= 1e-12


def test_frozen_parameters_are_skipped(make_case, dense, rel_err):
    case = make_case("mlp")
    full = dense_hessian(case.model, case.data, case.loss)
    case.model[0].weight.requires_grad_(False)
    operator = HessianOperator(case.model, case.data, case.loss)
    assert list(operator.params) == ["0.bias", "2.weight", "2.bias"]
    index = _index_of(case.model, operator.params)
    assert rel_err(dense(operator), full[index][:, index]) <= 1e-12
    assert case.model[0].weight.requires_grad is False  # still frozen afterwards


class KeywordMLP(nn.Module):
    """A model called with keyword arguments, as HF models are: ``model(input_ids=..., ...)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, features, scale=None):
        output = self.net(features)
        return output if scale is None else output * scale


class DictBatchLoss(LossFunction):
    """Cross-entropy on ``{"features", "labels"}`` dict batches; -100 labels are ignored."""

    def forward(self, model, batch):
        return model(features=batch["features"])

    def loss(self, output, batch):
        return F.cross_entropy(output, batch["labels"])

    def per_sample_losses(self, output, batch):
        losses = F.cross_entropy(output, batch["labels"], reduction="none")
        return losses[batch["labels"] != -100]

    def num_samples(self, batch):
        return int((batch["labels"] != -100).sum())


class BatchEncodingLike(UserDict):
    """The parts of HF's ``BatchEncoding`` that matter here: a ``UserDict`` (not a dict) whose
    keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError as error:
            raise AttributeError(name) from error


def _keyword_model(make_case):
    case = make_case("mlp")
    model = KeywordMLP().to(DTYPE)
    model.net.load_state_dict(case.model.state_dict())
    return case, model


def test_dict_batches(make_case, dense, rel_err):
    case, model = _keyword_model(make_case)
    reference = dense_hessian(case.model, case.data, case.loss)
    dict_data = [{"features": x, "labels": y} for x, y in case.data]
    operator = HessianOperator(model, dict_data, DictBatchLoss())
    assert rel_err(dense(operator), reference) <= 1e-12
    assert operator.num_data == 8
    # supervised_loss with dict inputs: (dict of keyword arguments, targets)
    from torch_linop import supervised_loss

    keyword_data = [({"features": x, "scale": None}, y) for x, y in case.data]
    ggn = GGNOperator(model, keyword_data, supervised_loss(F.cross_entropy))
    assert rel_err(dense(ggn), dense_ggn(case.model, case.data, case.loss)) <= 1e-12


@pytest.mark.parametrize("container", ["batch_encoding_like", "transformers_batch_encoding"])
def test_hf_style_batches_with_batch_size_fn(make_case, container, dense, rel_err):
    """``BatchEncoding`` batches keep their type (the loss reads ``batch.labels``), and
    ``batch_size_fn`` decides the batch weights."""
    if container == "transformers_batch_encoding":
        transformers = pytest.importorskip("transformers")
        wrap = transformers.BatchEncoding
    else:
        wrap = BatchEncodingLike
    case, model = _keyword_model(make_case)
    labels = [y.clone() for _, y in case.data]
    labels[0][:2] = -100  # 3 + 3 counted samples
    data = [wrap({"features": x, "labels": y}) for (x, _), y in zip(case.data, labels)]
    reference_data = list(zip([x for x, _ in case.data], labels))

    def attribute_loss(model, batch):  # needs the batch type preserved
        return F.cross_entropy(model(features=batch.features), batch.labels)

    def count_labels(batch):
        return int((batch["labels"] != -100).sum())

    operator = HessianOperator(model, data, attribute_loss, batch_size_fn=count_labels)
    assert operator.num_data == 6
    assert rel_err(dense(operator), dense_hessian(case.model, reference_data, case.loss)) <= 1e-12
    # without batch_size_fn the callable loss counts rows (5 and 3): a different weighting
    by_rows = dense(HessianOperator(model, data, attribute_loss))
    assert rel_err(by_rows, dense(operator)) > 1e-3
    fisher = EmpiricalFisherOperator(model, data, DictBatchLoss())
    assert fisher.num_data == 6


def test_num_batches_uses_a_fixed_prefix(make_case, dense, rel_err):
    case = make_case("mlp")
    operator = HessianOperator(case.model, case.data, case.loss, num_batches=1)
    assert operator.num_data == 5
    first_only = dense_hessian(case.model, case.data[:1], case.loss)
    assert rel_err(dense(operator), first_only) <= 1e-12
    given = HessianOperator(case.model, case.data, case.loss, num_data=5, num_batches=1)
    assert given.num_data == 5
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        HessianOperator(case.model, case.data, case.loss, num_batches=0)


def test_vector_helpers_round_trip(make_case):
    case = make_case("cnn_batchnorm_eval")
    params = dict(case.model.named_parameters())
    flat = parameters_to_vector(params)
    assert flat.shape == (sum(p.numel() for p in params.values()),)
    pieces = vector_to_parameters(flat, params)
    for name, param in params.items():
        assert torch.equal(pieces[name], param.detach())
    columns = torch.stack([flat, 2 * flat], dim=1)
    split = split_vector(columns, [p.shape for p in params.values()])
    assert split[0].shape == (2, *params["0.weight"].shape)
    assert torch.equal(join_tensors(split, batched=True), columns)
    with pytest.raises(ValueError, match="vector has 3 entries"):
        split_vector(torch.zeros(3), [p.shape for p in params.values()])


def test_dataloader_with_a_short_last_batch(make_case, dense, rel_err):
    from torch.utils.data import DataLoader, TensorDataset

    case = make_case("mlp")
    inputs = torch.cat([x for x, _ in case.data])
    labels = torch.cat([y for _, y in case.data])
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=3)  # batches of 3, 3, 2
    operator = HessianOperator(case.model, loader, case.loss)
    assert operator.num_data == 8
    whole = dense_hessian(case.model, [(inputs, labels)], case.loss)
    assert rel_err(dense(operator), whole) <= 1e-12
    too_short = DataLoader(TensorDataset(inputs[:2], labels[:2]), batch_size=3, drop_last=True)
    with pytest.raises(ValueError, match="data is empty \\(DataLoader of length 0\\)"):
        HessianOperator(case.model, too_short, case.loss)
