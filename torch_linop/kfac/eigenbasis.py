"""Products in a Kronecker-factored eigenbasis: ``Q_G (lambda * (Q_G^T M Q_A)) Q_A^T``.

EKFAC multiplies with its corrected eigenvalues this way, and the exactly damped KFAC inverse
with ``1 / (lambda_G lambda_A^T + damping)`` (Grosse et al., 2023, eq. 21).
"""

from __future__ import annotations

import torch


def weight_product(
    gradient_vectors: torch.Tensor,
    input_vectors: torch.Tensor,
    eigenvalues: torch.Tensor,
    block: torch.Tensor,
) -> torch.Tensor:
    """``block`` ``(out, in, k)`` times the matrix with eigenvectors ``Q_G kron Q_A`` and
    eigenvalues ``eigenvalues`` ``(out, in)``."""
    rotated = torch.einsum("ji,jlk,lm->imk", gradient_vectors, block, input_vectors)
    rotated = rotated * eigenvalues.unsqueeze(-1)
    return torch.einsum("ij,jlk,ml->imk", gradient_vectors, rotated, input_vectors)


def bias_product(
    gradient_vectors: torch.Tensor, eigenvalues: torch.Tensor, block: torch.Tensor
) -> torch.Tensor:
    """``block`` ``(out, k)`` times ``Q_G diag(eigenvalues) Q_G^T``."""
    return gradient_vectors @ (eigenvalues.unsqueeze(-1) * (gradient_vectors.T @ block))
