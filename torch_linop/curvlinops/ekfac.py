"""Drop-in for ``curvlinops.EKFACLinearOperator`` (curvlinops 3's arguments and semantics).

The operator is :class:`torch_linop.kfac.EKFACOperator` with curvlinops' data counts; the
curvlinops-named internals (``_corrected_eigenvalues`` keyed by parameter position for separate
weight and bias, ``_*_eigenvectors``) are views of ours.
"""

from __future__ import annotations

from typing import Any

import torch

from torch_linop.curvlinops.kfac import KFACLinearOperator, _CurvlinopsCounts
from torch_linop.kfac.ekfac import EKFACOperator
from torch_linop.kfac.types import FisherType


class _CurvlinopsEKFAC(_CurvlinopsCounts, EKFACOperator):
    """Our EKFAC with curvlinops' data counts."""


class EKFACLinearOperator(KFACLinearOperator):
    """curvlinops 3's ``EKFACLinearOperator`` (type-2, MC or empirical Fisher)."""

    _SUPPORTED_FISHER_TYPE: Any = (FisherType.TYPE2, FisherType.MC, FisherType.EMPIRICAL)
    _CORE = _CurvlinopsEKFAC

    def _maybe_compute_ekfac(self) -> None:
        self._core._prepare()

    def compute_eigenvalue_correction(self) -> None:
        """Correct the eigenvalues again (in the current eigenbasis)."""
        self._core._prepare()
        self._core.compute_eigenvalue_correction()

    def _check_deterministic(self) -> None:
        self._core.compute_factors()
        first = {k: dict(v) for k, v in self._core.corrected_eigenvalues.items()}
        self._core.compute_factors()
        for name, entry in first.items():
            for kind, value in entry.items():
                if not torch.allclose(value, self._core.corrected_eigenvalues[name][kind]):
                    raise RuntimeError(
                        f"Check for deterministic EKFAC eigenvalues failed for layer '{name}': "
                        "two passes over the data disagree (dropout, BatchNorm in train mode, "
                        "shuffled data?)."
                    )

    @property
    def _input_covariances_eigenvectors(self) -> dict[str, torch.Tensor]:
        self._core._prepare()
        return {k: v[0] for k, v in self._core._eigenvectors.items() if v[0] is not None}

    @property
    def _gradient_covariances_eigenvectors(self) -> dict[str, torch.Tensor]:
        self._core._prepare()
        return {k: v[1] for k, v in self._core._eigenvectors.items()}

    @property
    def _corrected_eigenvalues(self) -> dict[str, Any]:
        """curvlinops' layout: a tensor for a joined layer, else ``{position: tensor}``."""
        self._core._prepare()
        result: dict[str, Any] = {}
        for layer in self._core.layers:
            values = self._core.corrected_eigenvalues[layer.name]
            if "joined" in values:
                result[layer.name] = values["joined"]
                continue
            entry = {}
            if layer.weight_index is not None:
                entry[layer.weight_index] = values["weight"]
            if layer.bias_index is not None:
                entry[layer.bias_index] = values["bias"]
            result[layer.name] = entry
        return result

    def state_dict(self) -> dict[str, Any]:
        """curvlinops' keys, plus our eigenbasis and corrected eigenvalues."""
        state = super().state_dict()
        state.update(
            input_covariances_eigenvectors=self._input_covariances_eigenvectors,
            gradient_covariances_eigenvectors=self._gradient_covariances_eigenvectors,
            cached_activations={},
            corrected_eigenvalues=self._corrected_eigenvalues,
            torch_linop_ekfac={
                "eigenvectors": dict(self._core._eigenvectors),
                "corrected_eigenvalues": {
                    k: dict(v) for k, v in self._core.corrected_eigenvalues.items()
                },
            },
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        ours = state_dict.get("torch_linop_ekfac")
        if ours is None:
            raise ValueError(
                "this state_dict was not written by torch_linop's EKFACLinearOperator; "
                "recompute the eigenvalue correction instead"
            )
        self._core._eigenvectors = dict(ours["eigenvectors"])
        self._core.corrected_eigenvalues = {
            k: dict(v) for k, v in ours["corrected_eigenvalues"].items()
        }


__all__ = ["EKFACLinearOperator"]
