"""``hutchinson_squared_fro``: ``||A||_F^2 = E[||B z||^2]`` for probes ``z`` with ``E[z z^T] = I``,
``B = A`` or ``A^T`` (the side with fewer columns), one product per probe, as curvlinops."""

from __future__ import annotations

from typing import Any

import torch

from torch_linop.curvlinops._estimation import TorchOperand, draw_probes, resolve_seed


def hutchinson_squared_fro(
    A: Any, num_matvecs: int, distribution: str = "rademacher", *, seed: int | None = None
) -> Any:
    """Hutchinson's estimate of the squared Frobenius norm of any (also non-square) ``A`` from
    ``num_matvecs`` products; a 0-d tensor in ``A``'s dtype on its device."""
    if len(A.shape) != 2:
        raise ValueError(f"A must be a matrix. Got shape {tuple(A.shape)}.")
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < 1:
        raise ValueError(f"num_matvecs must be a positive int, got {num_matvecs!r}.")
    if num_matvecs >= min(A.shape):
        raise ValueError(
            f"num_matvecs ({num_matvecs}) must be less than the minimum dimension of A."
        )
    operand = TorchOperand(A)
    generator = torch.Generator().manual_seed(resolve_seed(seed))
    if A.shape[1] > A.shape[0]:  # wide: ||A||_F = ||A^T||_F, probes in the smaller space
        probes = draw_probes(operand, num_matvecs, distribution, generator, size=A.shape[0])
        products = operand.rmatmat(probes)
    else:
        probes = draw_probes(operand, num_matvecs, distribution, generator)
        products = operand.matmat(probes)
    return operand.result((products**2).sum() / num_matvecs)
