"""XTrace and XDiag for any square operator, as curvlinops computes them.

Epperly, Tropp and Webber, "XTrace: making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 2024 (arXiv:2301.07825). ``m`` probes ``W`` give ``Q R =
A W``; leaving probe ``i`` out of the basis gives ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with
``s_i`` the normalised ``i``-th column of ``R^{-T}``; each estimate is exact on ``Q_i`` and
Hutchinson's with probe ``i`` on its complement, and the ``m`` estimates are averaged. Nothing
assumes ``A = A^T`` (the diagonal uses ``A^T Q``), unlike our solvers' symmetric versions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_linop.curvlinops._estimation import TorchOperand, draw_probes


def _left_out_directions(triangular: Tensor) -> Tensor:
    """Columns ``s_i``: the normalised columns of ``R^{-T}``."""
    inverse_t = torch.linalg.inv(triangular.T)
    return inverse_t / (inverse_t**2).sum(0).sqrt()


def xtrace_estimate(
    operand: TorchOperand, num_probes: int, distribution: str, generator: torch.Generator
) -> Tensor:
    """The XTrace estimate of ``tr(A)`` from ``num_probes`` probes (``2 * num_probes`` products)."""
    probes = draw_probes(operand, num_probes, distribution, generator)
    products = operand.matmat(probes)
    basis, triangular = torch.linalg.qr(products)
    basis_products = operand.matmat(basis)
    directions = _left_out_directions(triangular)
    projected = basis.T @ basis_products  # Q^T A Q
    # tr(Q_i^T A Q_i) = tr(Q^T A Q) - s_i^T (Q^T A Q) s_i
    traces = projected.trace() - torch.einsum("ji,jk,ki->i", directions, projected, directions)
    # (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i, with Q_i Q_i^T = Q (I - s_i s_i^T) Q^T
    coordinates = basis.T @ probes  # Q^T w_i
    deflated = coordinates - directions * (directions * coordinates).sum(0)
    residual = products - basis_products @ deflated
    residual_coordinates = basis.T @ residual
    residual = residual - basis @ (
        residual_coordinates - directions * (directions * residual_coordinates).sum(0)
    )
    traces = traces + (probes * residual).sum(0)
    return traces.mean()


def xdiag_estimate(operand: TorchOperand, num_probes: int, generator: torch.Generator) -> Tensor:
    """The XDiag estimate of ``diag(A)`` from ``num_probes`` Rademacher probes (``2 *
    num_probes`` products, one block with ``A^T``)."""
    probes = draw_probes(operand, num_probes, "rademacher", generator)
    products = operand.matmat(probes)
    basis, triangular = torch.linalg.qr(products)
    basis_t_a = operand.rmatmat(basis).T  # Q^T A
    directions = _left_out_directions(triangular)
    diagonal = (basis * basis_t_a.T).sum(1)  # diag(Q Q^T A)
    diagonal = (
        diagonal
        - torch.einsum("ij,jk,lk,li->i", basis, directions, directions, basis_t_a) / num_probes
    )
    # (I - Q_i Q_i^T) A w_i = A w_i - Q (I - s_i s_i^T) Q^T A w_i
    coordinates = basis_t_a @ probes
    deflated = coordinates - directions * (directions * coordinates).sum(0)
    complement = products - basis @ deflated
    return diagonal + (probes * complement / probes**2).sum(1) / num_probes
