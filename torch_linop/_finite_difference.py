"""The step of finite-difference products ``f(theta + h v)``: large enough that the shifted
parameters survive rounding to their dtype, small enough that no single parameter moves by more
than a small fraction of its own size plus the typical parameter size.

Only the global rule ``h = eps**p * max(1, ||theta||) / ||v||`` is right for dense directions
but moves the parameters of a *concentrated* direction (a converged eigenvector living on a few
embedding rows or LayerNorm weights) by ``eps**p * ||theta|| / sqrt(support)`` each: far outside
the linear regime. Measured on a 2-layer GPT-2: Lanczos on such products found top eigenvalues
30% low and never converged. The per-entry cap ``h |v_i| <= eps**p (|theta_i| + rms(theta))``
keeps every entry's shift relative to its scale; for dense directions it costs a factor of a
few in the step (the largest entries of a Gaussian vector are a few standard deviations).
"""

from __future__ import annotations

import math

import torch

# Entries per group of multi-tensor (``torch._foreach_*``) kernels in :func:`entry_cap`: the
# temporaries are two copies of a group, so a group is at most this or one parameter tensor.
_GROUP_ENTRIES = 1 << 24


def entry_cap(theta: list[torch.Tensor], direction: list[torch.Tensor], rms: float) -> float:
    """``min_i (|theta_i| + rms) / |v_i|`` over all entries (inf where ``v`` is zero).

    Computed as ``1 / max_i |v_i| / (|theta_i| + rms)`` by multi-tensor kernels and one host
    read: a loop of per-tensor reductions, each read on the host, cost GPT-2 small ~150 syncs per
    product (the cached one-sided difference GGN was host-bound at 8x256 tokens on an H100)."""
    maxima: list[torch.Tensor] = []
    for group in _groups(theta, _GROUP_ENTRIES):
        ratios = torch._foreach_abs([direction[i] for i in group])
        scales = torch._foreach_abs([theta[i] for i in group])
        torch._foreach_add_(scales, rms)
        torch._foreach_div_(ratios, scales)
        del scales
        maxima.extend(torch._foreach_norm(ratios, ord=math.inf))
    if not maxima:
        return math.inf
    worst = float(torch.stack([m.to(torch.float64) for m in maxima]).max())
    return math.inf if worst == 0.0 else 1.0 / worst


def _groups(tensors: list[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive indices of non-empty tensors, in groups of at most ``limit`` entries (or one
    tensor, when a tensor alone is larger)."""
    groups: list[list[int]] = []
    size = 0
    for index, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            continue
        if groups and size + tensor.numel() <= limit:
            groups[-1].append(index)
            size += tensor.numel()
        else:
            groups.append([index])
            size = tensor.numel()
    return groups


def shifted(
    theta: list[torch.Tensor], direction: list[torch.Tensor], step: float, dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """``theta + step * v`` (multi-tensor kernels), each rounded to its parameter's dtype."""
    moved = torch._foreach_add(theta, direction, alpha=step)
    return [m if m.dtype == dtype else m.to(dtype) for m, dtype in zip(moved, dtypes)]


def step_size(
    eps: float, power: float, theta_norm: float, direction_norm: float, cap: float
) -> float:
    """``eps**power * min(max(1, ||theta||) / ||v||, cap)``, with ``cap`` from
    :func:`entry_cap` (computed with ``rms = ||theta|| / sqrt(number of entries)``)."""
    global_step = max(1.0, theta_norm) / direction_norm
    return eps**power * min(global_step, cap)


def local_step(
    theta: list[torch.Tensor],
    direction: list[torch.Tensor],
    theta_norm: float,
    direction_norm: float,
    eps: float,
    power: float,
) -> float:
    """The step for ``theta + h v`` when all of ``theta`` and ``v`` are on this process."""
    num_entries = sum(t.numel() for t in theta)
    cap = entry_cap(theta, direction, rms(theta_norm, num_entries))
    return step_size(eps, power, theta_norm, direction_norm, cap)


def rms(theta_norm: float, num_entries: int) -> float:
    """Root mean square of the parameters, with a floor for all-zero parameters."""
    return max(theta_norm / math.sqrt(max(1, num_entries)), 1e-3)


def norm_of(tensors: list[torch.Tensor]) -> float:
    """Euclidean norm of the concatenation of ``tensors`` (one host read)."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))
