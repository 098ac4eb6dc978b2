"""``KFACInverseOperator``: the damped inverse of KFAC (or EKFAC), factor by factor.

Three dampings, as curvlinops offers them: ``(A + d_A I)^-1 kron (G + d_G I)^-1`` with one
``damping`` or a ``(d_A, d_G)`` tuple; the heuristic pi-damping of Martens & Grosse (2015,
Sec. 6.3), ``d_A = max(pi sqrt(d), min_damping)``, ``d_G = max(sqrt(d) / pi, min_damping)``,
``pi = sqrt(mean eig A / mean eig G)``; and exact damping ``(A kron G + d I)^-1`` through the
factors' eigendecompositions (the only one for EKFAC, whose eigenvalues are corrected).
Cholesky factorisations that fail in low precision are retried in float64 when asked.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from torch_linop.kfac import eigenbasis
from torch_linop.kfac.blocks import KroneckerBlockOperator
from torch_linop.kfac.layers import KFACLayer

LayerInverse = dict[str, Any]


class KFACInverseOperator(KroneckerBlockOperator):
    """Damped inverse of a :class:`KFACOperator` or :class:`EKFACOperator` (see module doc)."""

    def __init__(
        self,
        kfac: Any,
        damping: float | tuple[float, float] = 0.0,
        *,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ) -> None:
        from torch_linop.kfac.ekfac import EKFACOperator
        from torch_linop.kfac.operator import KFACOperator

        if not isinstance(kfac, KFACOperator):
            raise ValueError(f"expected a KFACOperator or EKFACOperator, got {type(kfac).__name__}")
        if use_heuristic_damping and use_exact_damping:
            raise ValueError("Either use heuristic damping or exact damping, not both.")
        if (use_heuristic_damping or use_exact_damping) and isinstance(damping, tuple):
            raise ValueError("Heuristic and exact damping require a single damping value.")
        if isinstance(kfac, EKFACOperator) and not use_exact_damping:
            raise ValueError(
                "Only exact damping is supported for EKFAC: pass use_exact_damping=True"
            )
        self.kfac = kfac
        self.damping = damping
        self.use_heuristic_damping = use_heuristic_damping
        self.min_damping = min_damping
        self.use_exact_damping = use_exact_damping
        self.cache = cache
        self.retry_double_precision = retry_double_precision
        self.inverses: dict[str, LayerInverse] = {}
        self._init_layout(
            kfac.layers,
            kfac.param_names,
            kfac.param_shapes,
            kfac.separate_weight_and_bias,
            kfac.torch_dtype,
            kfac.device,
        )

    # ------------------------------------------------------------------ damping
    def factor_dampings(
        self, input_factor: torch.Tensor | None, gradient_factor: torch.Tensor
    ) -> tuple[float, float]:
        """``(d_A, d_G)`` for one layer's factors."""
        if self.use_heuristic_damping and input_factor is not None:
            input_mean = input_factor.trace() / input_factor.shape[0]
            gradient_mean = gradient_factor.trace() / gradient_factor.shape[0]
            if input_mean >= 0.0 and gradient_mean > 0.0:
                ratio = float((input_mean / gradient_mean).sqrt())
                root = math.sqrt(float(self.damping))  # type: ignore[arg-type]
                return max(root * ratio, self.min_damping), max(root / ratio, self.min_damping)
        if isinstance(self.damping, tuple):
            return self.damping
        return float(self.damping), float(self.damping)

    def _damped_inverse(self, factor: torch.Tensor, damping: float) -> torch.Tensor:
        eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        try:
            return torch.cholesky_inverse(torch.linalg.cholesky(factor + damping * eye))
        except RuntimeError as error:
            if not self.retry_double_precision or factor.dtype == torch.float64:
                raise RuntimeError(
                    f"{error}; the damped Kronecker factor is not positive definite: increase "
                    "the damping"
                    + (
                        ""
                        if self.retry_double_precision
                        else " or pass retry_double_precision=True"
                    )
                ) from error
            warnings.warn(
                f"Cholesky of a damped Kronecker factor failed in {factor.dtype} ({error}); "
                "retrying in float64",
                stacklevel=3,
            )
            chol = torch.linalg.cholesky(factor.double() + damping * eye.double())
            return torch.cholesky_inverse(chol).to(factor.dtype)

    # ------------------------------------------------------------------ per layer
    def _compute_layer(self, layer: KFACLayer) -> LayerInverse:
        from torch_linop.kfac.ekfac import EKFACOperator

        if isinstance(self.kfac, EKFACOperator):
            input_vectors, gradient_vectors = self.kfac.eigenvectors(layer)
            damping = float(self.damping)  # type: ignore[arg-type]
            return {
                "input_vectors": input_vectors,
                "gradient_vectors": gradient_vectors,
                "inverse_eigenvalues": {
                    kind: (values + damping).reciprocal()
                    for kind, values in self.kfac.corrected_eigenvalues[layer.name].items()
                },
            }
        input_factor, gradient_factor = self.kfac.factors(layer)
        if self.use_exact_damping:
            damping = float(self.damping)  # type: ignore[arg-type]
            gradient_values, gradient_vectors = torch.linalg.eigh(gradient_factor)
            entry: LayerInverse = {"gradient_vectors": gradient_vectors, "input_vectors": None}
            inverse_eigenvalues = {}
            if input_factor is not None:
                input_values, input_vectors = torch.linalg.eigh(input_factor)
                entry["input_vectors"] = input_vectors
                outer = torch.outer(gradient_values, input_values)
                inverse_eigenvalues["weight"] = (outer + damping).reciprocal()
            inverse_eigenvalues["bias"] = (gradient_values + damping).reciprocal()
            entry["inverse_eigenvalues"] = inverse_eigenvalues
            return entry
        input_damping, gradient_damping = self.factor_dampings(input_factor, gradient_factor)
        return {
            "input_inverse": (
                None if input_factor is None else self._damped_inverse(input_factor, input_damping)
            ),
            "gradient_inverse": self._damped_inverse(gradient_factor, gradient_damping),
        }

    def layer_inverse(self, layer: KFACLayer) -> LayerInverse:
        """The inverted factors (or eigenbasis and inverted eigenvalues) of one layer."""
        if layer.name in self.inverses:
            return self.inverses[layer.name]
        entry = self._compute_layer(layer)
        if self.cache:
            self.inverses[layer.name] = entry
        return entry

    def _prepare(self) -> None:
        self.kfac._prepare()

    def _weight_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        entry = self.layer_inverse(layer)
        if "inverse_eigenvalues" in entry:
            values = entry["inverse_eigenvalues"]
            key = "joined" if "joined" in values else "weight"
            return eigenbasis.weight_product(
                entry["gradient_vectors"], entry["input_vectors"], values[key], block
            )
        return torch.einsum(
            "ij,jlk,lm->imk", entry["gradient_inverse"], block, entry["input_inverse"]
        )

    def _bias_product(self, layer: KFACLayer, block: torch.Tensor) -> torch.Tensor:
        entry = self.layer_inverse(layer)
        if "inverse_eigenvalues" in entry:
            values = entry["inverse_eigenvalues"]["bias"]
            return eigenbasis.bias_product(entry["gradient_vectors"], values, block)
        return entry["gradient_inverse"] @ block

    def to_dense(self) -> torch.Tensor:
        """The ``(n, n)`` matrix (small models only)."""
        eye = torch.eye(self.shape[0], dtype=self.torch_dtype, device=self.device)
        return self._matmat_torch(eye)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Settings, the cached inverses, and the operator's own state under ``"kfac"``."""
        return {
            "kfac": self.kfac.state_dict(),
            "damping": self.damping,
            "use_heuristic_damping": self.use_heuristic_damping,
            "min_damping": self.min_damping,
            "use_exact_damping": self.use_exact_damping,
            "cache": self.cache,
            "retry_double_precision": self.retry_double_precision,
            "inverses": dict(self.inverses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the operator's factors, the settings and the cached inverses of ``state``."""
        self.kfac.load_state_dict(state["kfac"])
        for key in (
            "damping",
            "use_heuristic_damping",
            "min_damping",
            "use_exact_damping",
            "cache",
            "retry_double_precision",
        ):
            setattr(self, key, state[key])
        self.inverses = dict(state["inverses"])
