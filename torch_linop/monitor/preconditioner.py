"""Adam's diagonal preconditioner read from the optimiser state, and the stability thresholds
that sharpness and preconditioned sharpness are compared with.

``torch.optim.Adam``/``AdamW`` divide the bias-corrected first moment by
``P = sqrt(v / (1 - beta2^t)) + eps`` (``v`` = ``exp_avg_sq``, or ``max_exp_avg_sq`` with
``amsgrad``; ``t`` = the parameter's ``step``), so the preconditioned Hessian is
``P^-1/2 H P^-1/2`` (the spectrum of ``P^-1 H``). :func:`adam_inverse_sqrt_preconditioner`
returns the diagonal ``P^-1/2`` as one new vector; nothing of the state is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimiser inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def check_adam_like(optimizer: Any) -> None:
    """TypeError unless ``optimizer`` keeps Adam's state (``betas``, ``eps``, ``exp_avg_sq``)."""
    optimizer = unwrap_optimizer(optimizer)
    groups = getattr(optimizer, "param_groups", None)
    if not groups or not all("betas" in group and "eps" in group for group in groups):
        raise TypeError(
            f"preconditioned=True needs an Adam-type optimiser (torch.optim.Adam or AdamW, whose "
            f"param groups hold 'betas' and 'eps'), got {type(optimizer).__name__}; pass "
            "optimizer=your Adam/AdamW, or preconditioned=False"
        )


def _group_of(optimizer: Any, param: Tensor) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(candidate is param for candidate in group["params"]):
            return group
    raise ValueError(
        "a monitored parameter is not in the optimiser's param groups: pass the optimiser that "
        "trains these parameters (or restrict the monitor with param_filter)"
    )


def adam_inverse_sqrt_preconditioner(
    optimizer: Any, params: dict[str, Tensor], dtype: torch.dtype
) -> Tensor:
    """``P^-1/2`` for the parameters ``params`` (in their order, flattened and concatenated),
    with ``P = sqrt(v / (1 - beta2^t)) + eps`` exactly as ``torch.optim.Adam`` applies it.

    ValueError when a parameter has no optimiser state yet (call after ``optimizer.step()``).
    """
    optimizer = unwrap_optimizer(optimizer)
    pieces = []
    for name, param in params.items():
        group = _group_of(optimizer, param)
        state = optimizer.state.get(param, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(
                f"parameter {name!r} has no Adam state ({key!r}) yet: the preconditioned "
                "sharpness exists after the first optimizer.step() that updated it"
            )
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        second_moment = state[key].detach().to(dtype)
        bias_correction2 = 1.0 - beta2**step
        # the same expression as torch.optim.adam: (sqrt(v) / sqrt(1 - beta2^t)) + eps
        denominator = second_moment.sqrt() / bias_correction2**0.5 + float(group["eps"])
        pieces.append(denominator.rsqrt().reshape(-1))
    return torch.cat(pieces)


def learning_rate_and_beta1(optimizer: Any, params: dict[str, Tensor]) -> tuple[float, float]:
    """The ``lr`` and ``beta1`` shared by the groups of ``params``; NaN where groups differ
    (no single threshold line then) and ``beta1`` NaN for optimisers without betas."""
    optimizer = unwrap_optimizer(optimizer)
    groups = {
        id(_group_of(optimizer, param)): _group_of(optimizer, param) for param in params.values()
    }
    rates = {float(group["lr"]) for group in groups.values()}
    betas = {
        float(group["betas"][0]) if "betas" in group else float("nan") for group in groups.values()
    }
    lr = rates.pop() if len(rates) == 1 else float("nan")
    beta1 = betas.pop() if len(betas) == 1 else float("nan")
    return lr, beta1


def gradient_descent_threshold(lr: float) -> float:
    """``2 / lr``: gradient descent on a quadratic diverges along eigenvalues above it."""
    return 2.0 / lr


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) lr)`` (38/lr for beta1 = 0.9): the largest eigenvalue of
    the preconditioned Hessian ``P^-1 H`` for which Adam's update with frozen ``P`` (EMA momentum
    ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``, ``x_{t+1} = x_t - lr m_t / P``) is stable on a
    quadratic; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", find the
    preconditioned sharpness equilibrating there. Derivation: along an eigenvector with
    eigenvalue ``a`` the iteration is ``x_{t+1} = (1 + beta1 - lr (1 - beta1) a) x_t - beta1
    x_{t-1}``, whose characteristic root reaches -1 at exactly this ``a``."""
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
