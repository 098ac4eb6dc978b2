"""Drop-in for ``curvlinops.KFACInverseLinearOperator`` (damped KFAC / EKFAC inverse).

Same arguments and semantics as curvlinops 3: ``damping`` (or a ``(input, gradient)`` tuple),
heuristic pi-damping with ``min_damping``, exact damping through eigendecompositions (the only
one for EKFAC), cached inverted factors, float64 retry of failed Cholesky factorisations.
"""

from __future__ import annotations

from typing import Any

from torch_linop.curvlinops.kfac import KFACLinearOperator, PyTorchOperatorFace
from torch_linop.kfac.inverse import KFACInverseOperator


class KFACInverseLinearOperator(PyTorchOperatorFace):
    """curvlinops 3's ``KFACInverseLinearOperator``."""

    def __init__(
        self,
        A: KFACLinearOperator,
        damping: float | tuple[float, float] = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ) -> None:
        if not isinstance(A, KFACLinearOperator):
            raise ValueError("The input `A` must be an instance of `KFACLinearOperator`.")
        self._A = A
        self._core = KFACInverseOperator(
            A._core,
            damping,
            use_heuristic_damping=use_heuristic_damping,
            min_damping=min_damping,
            use_exact_damping=use_exact_damping,
            cache=cache,
            retry_double_precision=retry_double_precision,
        )
        self._init_face(A._in_shape)

    @property
    def _damping(self) -> Any:
        return self._core.damping

    def state_dict(self) -> dict[str, Any]:
        """curvlinops' keys: the KFAC state under ``"A"``, the settings, the cached inverses."""
        core = self._core
        return {
            "A": self._A.state_dict(),
            "damping": core.damping,
            "use_heuristic_damping": core.use_heuristic_damping,
            "min_damping": core.min_damping,
            "use_exact_damping": core.use_exact_damping,
            "cache": core.cache,
            "retry_double_precision": core.retry_double_precision,
            "inverse_input_covariances": dict(core.inverses),
            "inverse_gradient_covariances": {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._A.load_state_dict(state_dict["A"])
        core = self._core
        core.damping = state_dict["damping"]
        core.use_heuristic_damping = state_dict["use_heuristic_damping"]
        core.min_damping = state_dict["min_damping"]
        core.use_exact_damping = state_dict["use_exact_damping"]
        core.cache = state_dict["cache"]
        core.retry_double_precision = state_dict["retry_double_precision"]
        core.inverses = dict(state_dict["inverse_input_covariances"])

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Any], A: KFACLinearOperator
    ) -> KFACInverseLinearOperator:
        inverse = cls(
            A,
            damping=state_dict["damping"],
            use_heuristic_damping=state_dict["use_heuristic_damping"],
            min_damping=state_dict["min_damping"],
            use_exact_damping=state_dict["use_exact_damping"],
            cache=state_dict["cache"],
            retry_double_precision=state_dict["retry_double_precision"],
        )
        inverse.load_state_dict(state_dict)
        return inverse


__all__ = ["KFACInverseLinearOperator"]
