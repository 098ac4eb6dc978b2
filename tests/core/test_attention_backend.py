"""Products through ``F.scaled_dot_product_attention`` select the differentiable (math) backend
themselves, and give the user's backend setting back afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_linop import GGNOperator, HessianOperator
from torch_linop.reference import dense_ggn, dense_hessian


def backend_flags():
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )


def fused_sdpa_lacks_forward_ad() -> bool:
    q = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    try:
        torch.func.jvp(lambda t: F.scaled_dot_product_attention(t, t, t), (q,), (q,))
    except (NotImplementedError, RuntimeError):
        return True
    return False


def test_forward_mode_products_run_under_the_math_backend(make_case, dense, rel_err):
    case = make_case("sdpa_attention")
    seen = []
    case.model.register_forward_pre_hook(lambda module, args: seen.append(backend_flags()))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # the user's choice
        user_flags = backend_flags()
        if fused_sdpa_lacks_forward_ad():  # what makes the backend switch necessary
            with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):
                torch.func.jvp(lambda x: case.model(x), (case.data[0][0],), (case.data[0][0],))
        seen.clear()
        forward = HessianOperator(case.model, case.data, case.loss, method="forward")
        matrix = dense(forward)
        ggn = dense(GGNOperator(case.model, case.data, case.loss, jvp_method="forward"))
        assert backend_flags() == user_flags  # given back
    assert seen and all(flags == (False, False, True) for flags in seen)  # math only, inside
    assert rel_err(matrix, dense_hessian(case.model, case.data, case.loss)) <= 1e-10
    assert rel_err(ggn, dense_ggn(case.model, case.data, case.loss)) <= 1e-10


def test_backend_is_given_back_when_a_product_raises(make_case):
    case = make_case("sdpa_attention")
    broken = [(case.data[0][0][..., :3], case.data[0][1])]  # wrong feature size: forward raises
    operator = HessianOperator(case.model, broken, case.loss, method="forward")
    before = backend_flags()
    with pytest.raises(RuntimeError):
        operator @ torch.ones(operator.shape[0], dtype=torch.float64)
    assert backend_flags() == before


def test_transformer_encoder_fast_path_is_off_during_products(make_data, dense, rel_err):
    """In eval mode ``nn.TransformerEncoderLayer`` takes a native fast path (no forward-mode AD)
    whenever no input requires grad, which is the case inside the vmapped ``torch.func.jvp``
    that batches GGN columns. Products switch it off, so matmat stays batched and exact."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.layer(x).mean(1))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Encoder().double().eval()
    data = make_data((3, 4))
    from torch_linop import supervised_loss

    loss = supervised_loss(F.cross_entropy)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    operator = GGNOperator(model, data, loss)
    assert rel_err(dense(operator), dense_ggn(model, data, loss)) <= 1e-10
    assert operator.capabilities.vmap_jvp.supported  # the k columns went through one vmapped pass
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
