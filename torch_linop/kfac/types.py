"""The two choices that define a Kronecker-factored approximation: which Fisher, which KFAC.

Names and string values are curvlinops 3's (``FisherType.MC == "mc"``), so code written for
curvlinops passes the same strings to our operators.
"""

from __future__ import annotations

from enum import Enum, EnumMeta
from typing import Any


class _MembershipEnumMeta(EnumMeta):
    """``"mc" in FisherType`` is True for valid values (curvlinops' behaviour)."""

    def __contains__(cls, item: Any) -> bool:
        try:
            cls(item)
        except ValueError:
            return False
        return True


class FisherType(str, Enum, metaclass=_MembershipEnumMeta):
    """Which curvature the gradient covariance approximates.

    ``TYPE2``: the exact output-Hessian square root (one backward pass per output dimension);
    ``MC``: gradients of labels sampled from the model's predictive distribution;
    ``EMPIRICAL``: gradients of the true labels; ``FORWARD_ONLY``: identity gradient
    covariances (FOOF / ISAAC), no backward pass.
    """

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum, metaclass=_MembershipEnumMeta):
    """How weight-shared dimensions (sequence positions, convolution locations) are treated
    (Eschenhagen et al., 2023): ``EXPAND`` treats each position as a sample, ``REDUCE``
    averages inputs and sums output gradients over positions first."""

    EXPAND = "expand"
    REDUCE = "reduce"


def check_choice(value: Any, enum: type[Enum], argument: str) -> Any:
    """``enum(value)``, or a ValueError that lists the valid values."""
    if value not in enum:  # type: ignore[operator]
        valid = [member.value for member in enum]  # type: ignore[var-annotated]
        raise ValueError(f"invalid {argument}={value!r}; use one of {valid}")
    return enum(value)
