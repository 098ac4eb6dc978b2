"""Every operator against dense matrices built independently with ``torch.func``.

Two references: ``torch_linop.reference`` (shared conventions, no shared product code) and, in this
file, hand-built ones from ``functional_call`` + ``torch.func.hessian``/``jacrev`` where the
dataset loss is written as ``sum of per-sample losses / N`` (no batch weights at all) and the
loss's output Hessian comes from ``torch.func.hessian`` (no closed form). Models: MLP, CNN with
BatchNorm in eval mode, SDPA attention, ``nn.MultiheadAttention``, LSTM; float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_linop import EmpiricalFisherOperator, GGNOperator, HessianOperator
from torch_linop.reference import dense_empirical_fisher, dense_ggn, dense_hessian

EXACT = 1e-10  # autodiff paths: rounding error only
FINITE_DIFFERENCE = 1e-7  # documented: ~1e-10 relative in float64 for these models


def _flat(model):
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def unflatten(vector):
        return {n: c.view(s) for n, c, s in zip(names, torch.split(vector, sizes), shapes)}

    return flat, unflatten


def hand_hessian(model, data):
    """Hessian of ``sum_i CE_i / N`` with ``torch.func.hessian`` (forward-over-reverse)."""
    flat, unflatten = _flat(model)
    total = sum(int(y.numel()) for _, y in data)

    def dataset_loss(vector):
        values = unflatten(vector)
        losses = [
            F.cross_entropy(functional_call(model, values, (x,)), y, reduction="sum")
            for x, y in data
        ]
        return torch.stack(losses).sum() / total

    with sdpa_kernel([SDPBackend.MATH]):
        return hessian(dataset_loss)(flat)


def hand_ggn(model, data):
    """``sum_b J_b^T (d^2 loss / d output^2) J_b`` with ``jacrev`` and ``torch.func.hessian``."""
    flat, unflatten = _flat(model)
    total = sum(int(y.numel()) for _, y in data)
    result = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        for x, y in data:
            logits = functional_call(model, unflatten(flat), (x,))
            jacobian = jacrev(lambda v, x=x: functional_call(model, unflatten(v), (x,)))(flat)
            jacobian = jacobian.reshape(logits.numel(), -1)
            output_hessian = hessian(
                lambda z, y=y, shape=logits.shape: (
                    F.cross_entropy(z.view(shape), y, reduction="sum") / total
                )
            )(logits.reshape(-1))
            result += jacobian.T @ output_hessian @ jacobian
    return result


HESSIANS = {
    "hessian_autograd": (lambda c: HessianOperator(c.model, c.data, c.loss), EXACT),
    "hessian_forward": (
        lambda c: HessianOperator(c.model, c.data, c.loss, method="forward"),
        EXACT,
    ),
    "hessian_finite_difference": (
        lambda c: HessianOperator(c.model, c.data, c.loss, method="finite_difference"),
        FINITE_DIFFERENCE,
    ),
}
GGNS = {
    f"ggn_{jvp}": (
        lambda c, jvp=jvp: GGNOperator(c.model, c.data, c.loss, jvp_method=jvp),
        FINITE_DIFFERENCE if jvp == "finite_difference" else EXACT,
    )
    for jvp in ("auto", "forward", "double_backward", "finite_difference")
}


def _probe(operator, dense):
    """Exact paths: the whole matrix. Finite differences cost two gradients per column, so they
    are checked on six random columns (``H V`` against ``H_dense V``)."""
    if "finite_difference" in (
        getattr(operator, "method", ""),
        getattr(operator, "jvp_method", ""),
    ):
        generator = torch.Generator().manual_seed(5)
        columns = torch.randn(operator.shape[0], 6, generator=generator, dtype=torch.float64)
        return operator @ columns, columns
    return dense(operator), None


def _check(product, columns, reference, tolerance, rel_err):
    expected = reference if columns is None else reference @ columns
    assert rel_err(product, expected) <= tolerance


@pytest.mark.parametrize("method", list(HESSIANS))
def test_hessian_matches_dense(tiny_case, method, dense, rel_err):
    build, tolerance = HESSIANS[method]
    product, columns = _probe(build(tiny_case), dense)
    reference = dense_hessian(tiny_case.model, tiny_case.data, tiny_case.loss)
    _check(product, columns, reference, tolerance, rel_err)
    _check(product, columns, hand_hessian(tiny_case.model, tiny_case.data), tolerance, rel_err)


@pytest.mark.parametrize("method", list(GGNS))
def test_ggn_matches_dense(tiny_case, method, dense, rel_err):
    build, tolerance = GGNS[method]
    product, columns = _probe(build(tiny_case), dense)
    reference = dense_ggn(tiny_case.model, tiny_case.data, tiny_case.loss)
    _check(product, columns, reference, tolerance, rel_err)
    _check(product, columns, hand_ggn(tiny_case.model, tiny_case.data), tolerance, rel_err)


def test_empirical_fisher_matches_dense(tiny_case, dense, rel_err):
    matrix = dense(EmpiricalFisherOperator(tiny_case.model, tiny_case.data, tiny_case.loss))
    reference = dense_empirical_fisher(tiny_case.model, tiny_case.data, tiny_case.loss)
    assert rel_err(matrix, reference) <= EXACT


def test_matrices_are_symmetric_and_ggn_is_psd(make_case, dense):
    case = make_case("mlp")
    hessian_matrix = dense(HessianOperator(case.model, case.data, case.loss))
    ggn_matrix = dense(GGNOperator(case.model, case.data, case.loss))
    assert torch.allclose(hessian_matrix, hessian_matrix.T, rtol=0, atol=1e-13)
    assert torch.allclose(ggn_matrix, ggn_matrix.T, rtol=0, atol=1e-13)
    assert float(torch.linalg.eigvalsh(ggn_matrix).min()) > -1e-12
    # a tanh MLP under cross-entropy has negative curvature: the GGN is not the Hessian
    assert float(torch.linalg.eigvalsh(hessian_matrix).min()) < -1e-6


def test_forward_ad_fallback_is_exact(make_data, dense, rel_err):
    """A layer without forward-mode AD (custom autograd.Function): the GGN's ``auto`` JVP falls
    back to the exact double-backward JVP; ``forward`` reports the missing support."""

    class Softplus(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return F.softplus(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * torch.sigmoid(x)  # differentiable: double backward works

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(4, 5)
            self.second = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.second(Softplus.apply(self.first(x)))

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = Net().double()
    data = make_data((4,))
    from torch_linop import supervised_loss

    loss = supervised_loss(F.cross_entropy)
    operator = GGNOperator(model, data, loss)
    assert rel_err(dense(operator), dense_ggn(model, data, loss)) <= EXACT
    assert operator.capabilities.forward_ad.supported is False  # the fallback was taken
    with pytest.raises(RuntimeError, match="forward"):
        GGNOperator(model, data, loss, jvp_method="forward") @ torch.ones(
            operator.shape[0], dtype=torch.float64
        )
    hessian_matrix = dense(HessianOperator(model, data, loss))
    assert rel_err(hessian_matrix, dense_hessian_by_double_backward(model, data, loss)) <= EXACT


def dense_hessian_by_double_backward(model, data, loss):
    """Hessian column by column with plain ``torch.autograd.grad`` (for models without
    forward-mode AD, where ``torch.func.hessian`` cannot run)."""
    flat, unflatten = _flat(model)
    leaf = flat.clone().requires_grad_(True)
    total = sum(int(y.numel()) for _, y in data)
    value = (
        sum(
            F.cross_entropy(functional_call(model, unflatten(leaf), (x,)), y, reduction="sum")
            for x, y in data
        )
        / total
    )
    (gradient,) = torch.autograd.grad(value, leaf, create_graph=True)
    rows = [torch.autograd.grad(g, leaf, retain_graph=True)[0] for g in gradient]
    return torch.stack(rows)


def test_seed_style_split_loss_and_autograd_output_hessian(make_case, dense, rel_err):
    """``GGNOperator(model, data, forward_fn, loss_of_output_fn)``: with the library's
    ``supervised_loss_of_output`` (closed form) and with a plain lambda (the output Hessian by
    autograd); both equal the dense GGN. A criterion without closed form (``smooth_l1_loss``)
    goes through autograd too."""
    from torch_linop import supervised_forward, supervised_loss, supervised_loss_of_output

    case = make_case("mlp")
    reference = dense_ggn(case.model, case.data, case.loss)
    closed = GGNOperator(
        case.model, case.data, supervised_forward, supervised_loss_of_output(F.cross_entropy)
    )
    assert rel_err(dense(closed), reference) <= EXACT

    def plain(output, batch):
        return F.cross_entropy(output, batch[1])

    by_autograd = GGNOperator(case.model, case.data, supervised_forward, plain)
    assert rel_err(dense(by_autograd), reference) <= EXACT
    with pytest.raises(NotImplementedError, match="per_sample_losses"):
        EmpiricalFisherOperator(case.model, case.data, supervised_forward, plain) @ torch.ones(
            by_autograd.shape[0], dtype=torch.float64
        )
    generator = torch.Generator().manual_seed(6)
    regression = [
        (x, torch.randn(x.shape[0], 3, generator=generator, dtype=torch.float64))
        for x, _ in case.data
    ]
    smooth = supervised_loss(F.smooth_l1_loss)
    generic = GGNOperator(case.model, regression, smooth)
    assert rel_err(dense(generic), dense_ggn(case.model, regression, smooth)) <= EXACT
