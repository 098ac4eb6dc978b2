"""Closed-form output Hessians of standard losses and their Monte-Carlo (sampled) versions.

All functions take ``vectors`` with a leading column axis ``k``: shape ``(k, *output.shape)``,
and a ``scale`` (1/count for a mean reduction, 1 for a sum). Sampled versions draw their random
numbers from a CPU generator and move them to the output's device, so a seed gives the same
numbers on CPU and GPU.
"""

from __future__ import annotations

import torch


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float32).to(like.device)


def _normal(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def mse_hvp(vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """Hessian of ``scale * sum((output - target) ** 2)`` times ``vectors``: ``2 * scale * v``."""
    return vectors * (2.0 * scale)


def mse_sampled_hvp(
    output: torch.Tensor,
    vectors: torch.Tensor,
    scale: float,
    generator: torch.Generator,
    mc_samples: int,
) -> torch.Tensor:
    """MC Fisher of the squared error: ``2 scale / M sum_m z_m <z_m, v>`` per sample, z ~ N(0, I)."""
    result = torch.zeros_like(vectors)
    sample_dims = tuple(range(2, vectors.dim()))
    for _ in range(mc_samples):
        noise = _normal(tuple(output.shape), generator, output)
        inner = (
            (vectors * noise).sum(dim=sample_dims, keepdim=True) if sample_dims else vectors * noise
        )
        result += noise * inner
    return result * (2.0 * scale / mc_samples)


def softmax_ce_rows_hvp(
    logits: torch.Tensor, vectors: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Cross-entropy Hessian w.r.t. logits (class axis last) times ``vectors`` (``(k, ..., C)``):
    per valid row ``p * v - p * <p, v>``, scaled; rows without a target are zero. The eager
    reference of the fused kernel computes it (it broadcasts over the column axis)."""
    from torch_linop.kernels._ce_hvp_reference import _ce_hvp_core

    return _ce_hvp_core(logits, vectors, valid, scale, vectors.dtype)


def softmax_ce_rows_sampled_hvp(
    logits: torch.Tensor,
    vectors: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    generator: torch.Generator,
    mc_samples: int,
) -> torch.Tensor:
    """MC Fisher of cross-entropy: classes drawn from softmax(logits) by inverse CDF; the
    gradient sample is ``p - onehot(c)`` and the estimate ``scale / M sum g <g, v>`` per row."""
    probs = torch.softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), -1)
    num_classes = probs.shape[-1]
    cumulative = probs.cumsum(dim=-1)
    vectors_acc = vectors.to(probs.dtype)
    result = torch.zeros_like(vectors_acc)
    for _ in range(mc_samples):
        uniform = _uniform(tuple(probs.shape[:-1]), generator, probs).to(probs.dtype)
        uniform = uniform * cumulative[..., -1]
        classes = torch.searchsorted(cumulative.contiguous(), uniform.unsqueeze(-1)).clamp_(
            max=num_classes - 1
        )
        gradient = probs.clone()
        gradient.scatter_add_(-1, classes, -torch.ones_like(classes, dtype=probs.dtype))
        inner = (vectors_acc * gradient).sum(dim=-1, keepdim=True)
        result += gradient * inner
    result = result * (scale / mc_samples)
    if valid is not None:
        result = result * valid.unsqueeze(-1).to(result.dtype)
    return result.to(vectors.dtype)


def bce_logits_hvp(logits: torch.Tensor, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """Binary cross-entropy with logits: diagonal Hessian ``sigma (1 - sigma)``, scaled."""
    sigma = torch.sigmoid(logits)
    return vectors * (sigma * (1 - sigma) * scale)


def bce_logits_sampled_hvp(
    logits: torch.Tensor,
    vectors: torch.Tensor,
    scale: float,
    generator: torch.Generator,
    mc_samples: int,
) -> torch.Tensor:
    """MC Fisher of BCE with logits: ``y ~ Bernoulli(sigma)``, gradient sample ``sigma - y``."""
    sigma = torch.sigmoid(logits)
    total = torch.zeros_like(sigma)
    for _ in range(mc_samples):
        draws = (_uniform(tuple(sigma.shape), generator, sigma) < sigma).to(sigma.dtype)
        total += (sigma - draws) ** 2
    return vectors * (total * (scale / mc_samples))
