"""``nn.Embedding(padding_idx=...)``: reverse mode freezes the padding row, forward mode and
finite differences would move it. Every method computes autograd's matrix: the true curvature of
the network (written without ``padding_idx``) with the padding row's rows and columns zeroed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import EmpiricalFisherOperator, GGNOperator, HessianOperator, supervised_loss

DTYPE = torch.float64
VOCAB, WIDTH, CLASSES, PAD = 5, 3, 2, 1


class BagOfEmbeddings(nn.Module):
    def __init__(self, padding_idx: int = PAD):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


def model_and_data():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BagOfEmbeddings().to(DTYPE)
        with torch.no_grad():
            model.embed.weight[PAD].normal_()  # a padding row that is not zero
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (4, 3), generator=generator) for _ in range(2)]
    tokens[0][:, -1] = PAD  # right padding in the first batch, a PAD inside the second
    tokens[1][0, 0] = PAD
    labels = [torch.randint(0, CLASSES, (4,), generator=generator) for _ in range(2)]
    return model, list(zip(tokens, labels))


def logits_of(values, tokens):
    """The network without padding_idx: the padding row is a parameter like any other."""
    hidden = torch.tanh(F.embedding(tokens, values["embed.weight"])).mean(1)
    return hidden @ values["head.weight"].T + values["head.bias"]


def oracles(model, data):
    """Hessian and GGN of the mean cross-entropy (torch.func, no padding_idx), padding row frozen."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, sizes = list(params), [p.numel() for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    total = sum(int(y.numel()) for _, y in data)

    def unflatten(vector):
        return {n: c.view(params[n].shape) for n, c in zip(names, vector.split(sizes))}

    def loss_of(vector):
        values = unflatten(vector)
        return (
            sum(F.cross_entropy(logits_of(values, x), y, reduction="sum") for x, y in data) / total
        )

    hessian = torch.func.hessian(loss_of)(flat)
    ggn = torch.zeros_like(hessian)
    for x, _ in data:
        logits = logits_of(params, x)
        jacobian = torch.func.jacrev(lambda v, x=x: logits_of(unflatten(v), x))(flat)
        probs = torch.softmax(logits, 1)
        for row, p in zip(jacobian, probs):
            ggn += row.T @ (torch.diag(p) - torch.outer(p, p)) @ row / total
    frozen = torch.zeros(len(flat), dtype=torch.bool)
    frozen[PAD * WIDTH : (PAD + 1) * WIDTH] = True  # embed.weight comes first
    for matrix in (hessian, ggn):
        matrix[frozen] = 0
        matrix[:, frozen] = 0
    return hessian, ggn


OPERATORS = {
    "hessian_autograd": (HessianOperator, {}, "hessian"),
    "hessian_forward": (HessianOperator, {"method": "forward"}, "hessian"),
    "hessian_finite_difference": (HessianOperator, {"method": "finite_difference"}, "hessian"),
    "ggn_auto": (GGNOperator, {}, "ggn"),
    "ggn_double_backward": (GGNOperator, {"jvp_method": "double_backward"}, "ggn"),
    "ggn_finite_difference": (GGNOperator, {"jvp_method": "finite_difference"}, "ggn"),
    "hessian_cached_graph": (HessianOperator, {"cache_graph": True}, "hessian"),
    "ggn_cached_graph": (GGNOperator, {"cache_graph": True}, "ggn"),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_every_method_freezes_the_padding_row(name):
    model, data = model_and_data()
    hessian, ggn = oracles(model, data)
    operator_class, options, kind = OPERATORS[name]
    operator = operator_class(model, data, supervised_loss(F.cross_entropy), **options)
    matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
    expected = hessian if kind == "hessian" else ggn
    tolerance = 1e-6 if "finite_difference" in name else 1e-12
    assert float((matrix - expected).norm() / expected.norm()) < tolerance


def test_empirical_fisher_freezes_the_padding_row():
    model, data = model_and_data()
    operator = EmpiricalFisherOperator(model, data, supervised_loss(F.cross_entropy))
    matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
    assert matrix[PAD * WIDTH : (PAD + 1) * WIDTH].abs().max() == 0
    assert matrix[:, PAD * WIDTH : (PAD + 1) * WIDTH].abs().max() == 0
    assert torch.allclose(matrix, matrix.T, rtol=0, atol=1e-15)


def test_a_padding_row_tied_to_another_module_is_not_frozen():
    """A tied LM head's gradient reaches the padding row, so autograd does not freeze it."""
    from torch_linop.params import frozen_entries

    model, _ = model_and_data()
    params = dict(model.named_parameters())
    assert frozen_entries(model, params).tolist() == list(range(PAD * WIDTH, (PAD + 1) * WIDTH))
    head = nn.Linear(WIDTH, VOCAB, bias=False).to(DTYPE)
    head.weight = model.embed.weight
    tied = nn.ModuleDict({"body": model, "lm_head": head})
    assert frozen_entries(tied, dict(tied.named_parameters())) is None


class TiedPaddingLM(nn.Module):
    """An embedding with a padding row tied to the output head (as in a tied LM)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=PAD)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))).movedim(-1, 1)  # (B, V, T)


def tied_case():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TiedPaddingLM().to(DTYPE)
        with torch.no_grad():
            model.embed.weight[PAD].normal_()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (3, 4), generator=generator)
    tokens[:, 1] = PAD
    return model, [(tokens, torch.randint(0, VOCAB, (3, 4), generator=generator))]


TIED_OPERATORS = {
    "hessian_autograd": (HessianOperator, {}, False),
    "ggn_double_backward": (GGNOperator, {"jvp_method": "double_backward"}, False),
    "hessian_forward": (HessianOperator, {"method": "forward"}, True),
    "hessian_finite_difference": (HessianOperator, {"method": "finite_difference"}, True),
    "ggn_auto": (GGNOperator, {}, True),
}


@pytest.mark.parametrize("name", list(TIED_OPERATORS))
def test_a_tied_padding_row_warns_where_the_methods_disagree(name):
    """Reverse-mode products of a tied padding row are symmetric; forward mode and finite
    differences are not, and those operators warn when built."""
    import warnings

    model, data = tied_case()
    operator_class, options, asymmetric = TIED_OPERATORS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        operator = operator_class(model, data, supervised_loss(F.cross_entropy), **options)
    warned = [w for w in caught if "padding row of the embedding weight" in str(w.message)]
    assert len(warned) == int(asymmetric)
    matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
    asymmetry = float((matrix - matrix.T).norm() / matrix.norm())
    assert (asymmetry > 1e-3) if asymmetric else (asymmetry < 1e-12)
