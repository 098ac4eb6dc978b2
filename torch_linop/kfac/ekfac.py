"""``EKFACOperator``: KFAC's eigenbasis with corrected eigenvalues (George et al., 2018).

KFAC's block ``G kron A`` has eigenvectors ``Q_G kron Q_A``. EKFAC keeps them and replaces the
eigenvalues by the second moments of the per-example gradients in that basis,
``lambda = sum_n (Q_G^T grad_n Q_A)^2`` (over all backward signals, with the rows' loss
weights), which is the diagonal ``D`` minimising ``||F - Q D Q^T||_F`` for the curvature ``F``
those gradients sum to. A second hooked pass forms each example's gradient of one layer at a
time from its inputs and output gradients (no whole-model per-example gradients).
"""

from __future__ import annotations

from typing import Any

import torch

from torch_linop.kfac import eigenbasis
from torch_linop.kfac.factors import with_bias_column
from torch_linop.kfac.layers import KFACLayer
from torch_linop.kfac.operator import KFACOperator
from torch_linop.kfac.reduction import sum_tensors
from torch_linop.kfac.types import FisherType


class EKFACOperator(KFACOperator):
    """Eigenvalue-corrected KFAC; same arguments as :class:`KFACOperator` (not forward-only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.fisher_type == FisherType.FORWARD_ONLY:
            raise ValueError(
                "EKFAC needs gradients to correct the eigenvalues; use fisher_type 'type-2', "
                "'mc' or 'empirical'"
            )
        self._eigenvectors: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.corrected_eigenvalues: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def has_factors(self) -> bool:
        return bool(self.corrected_eigenvalues)

    def compute_factors(self) -> None:
        """KFAC's factors, their eigenvectors, then the eigenvalue correction (two passes)."""
        super().compute_factors()
        self._eigenvectors = {}
        for layer in self.layers:
            input_factor, gradient_factor = (
                self.input_covariances.get(layer.name),
                self.gradient_covariances[layer.name],
            )
            input_vectors = None if input_factor is None else torch.linalg.eigh(input_factor)[1]
            self._eigenvectors[layer.name] = (input_vectors, torch.linalg.eigh(gradient_factor)[1])
        self.compute_eigenvalue_correction()

    def eigenvectors(self, layer: KFACLayer) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(Q_A, Q_G)`` of ``layer`` (``Q_A`` is None for a bias-only layer)."""
        self._prepare()
        return self._eigenvectors[layer.name]

    def compute_eigenvalue_correction(self) -> None:
        """The corrected eigenvalues in the current eigenbasis (one hooked pass)."""
        num_samples, num_rows = self._counts()
        if self.fisher_type == FisherType.TYPE2 and num_rows > (self._num_data or num_samples):
            raise ValueError(
                "EKFAC with fisher_type='type-2' needs one loss term per example (a (batch, C) "
                f"output); these data have {num_rows} loss rows for {num_samples} examples. "
                "Backpropagating an output-Hessian column of all positions at once mixes the "
                "positions' terms in each example's gradient and inflates the eigenvalues; use "
                "fisher_type='mc', whose independent draws per position cancel those terms"
            )
        corrected: dict[str, dict[str, torch.Tensor]] = {}

        def on_gradients(layer: KFACLayer, inputs: torch.Tensor, gradients: torch.Tensor) -> None:
            input_vectors, gradient_vectors = self._eigenvectors[layer.name]
            rotated_gradients = gradients @ gradient_vectors  # (batch, shared, out)
            entry = corrected.setdefault(layer.name, {})
            for kind, _, _ in self.block_shapes(layer):
                if kind == "bias":
                    value = rotated_gradients.sum(1).square().sum(0)
                else:
                    assert input_vectors is not None
                    rows = with_bias_column(inputs) if kind == "joined" else inputs
                    rotated_inputs = rows @ input_vectors
                    per_example = torch.einsum("bso,bsi->boi", rotated_gradients, rotated_inputs)
                    value = per_example.square().sum(0)
                entry[kind] = entry[kind] + value if kind in entry else value

        self._hooked_pass(num_rows, None, on_gradients)
        sum_tensors(
            self.process_group,
            [
                corrected[name][kind]
                for name in sorted(corrected)
                for kind in sorted(corrected[name])
            ],
        )
        self.corrected_eigenvalues = corrected

    # ------------------------------------------------------------------ products
    def _weight_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        input_vectors, gradient_vectors = self.eigenvectors(layer)
        values = self.corrected_eigenvalues[layer.name]
        assert input_vectors is not None
        key = "joined" if "joined" in values else "weight"
        return eigenbasis.weight_product(gradient_vectors, input_vectors, values[key], block)

    def _bias_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        _, gradient_vectors = self.eigenvectors(layer)
        values = self.corrected_eigenvalues[layer.name]["bias"]
        return eigenbasis.bias_product(gradient_vectors, values, block)

    # ------------------------------------------------------------------ structure
    def _all_eigenvalues(self) -> torch.Tensor:
        self._prepare()
        return torch.cat(
            [v.reshape(-1) for entry in self.corrected_eigenvalues.values() for v in entry.values()]
        )

    def trace(self) -> torch.Tensor:
        """Sum of the corrected eigenvalues."""
        return self._all_eigenvalues().sum()

    def logdet(self) -> torch.Tensor:
        """Sum of the logs of the corrected eigenvalues."""
        return self._all_eigenvalues().log().sum()

    def det(self) -> torch.Tensor:
        """Product of the corrected eigenvalues (prefer :meth:`logdet`)."""
        return self._all_eigenvalues().prod()

    def frobenius_norm(self) -> torch.Tensor:
        """Root of the sum of the squared corrected eigenvalues."""
        return self._all_eigenvalues().square().sum().sqrt()

    def eigendecomposition(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        raise NotImplementedError(
            "EKFAC's eigenvalues are not products of factor eigenvalues; use eigenvectors(layer) "
            "and corrected_eigenvalues[layer.name]"
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """KFAC's state plus the eigenvectors and corrected eigenvalues."""
        state = super().state_dict()
        state["eigenvectors"] = dict(self._eigenvectors)
        state["corrected_eigenvalues"] = {k: dict(v) for k, v in self.corrected_eigenvalues.items()}
        return state

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self._eigenvectors = dict(state["eigenvectors"])
        self.corrected_eigenvalues = {k: dict(v) for k, v in state["corrected_eigenvalues"].items()}
