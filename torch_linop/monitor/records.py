"""What one curvature check records, and the history of checks as a JSON file.

A record holds plain Python numbers only (no tensors), so a history can be saved, loaded, plotted
or sent to a logger without the model around.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

HISTORY_FORMAT = "torch-linop curvature history"
HISTORY_VERSION = 1


@dataclass
class CheckRecord:
    """One check of a :class:`~torch_linop.monitor.CurvatureMonitor` at training step ``step``.

    Keyed by quantity name ("top_eigenvalue", "preconditioned_top_eigenvalue", "trace"):
    ``values`` (eigenvalues largest first; ``[estimate]`` for the trace), ``stderr`` (standard
    errors of estimates: the trace), ``residuals`` (``||H v - lambda v||`` of each eigenpair),
    ``num_matvecs`` (curvature products spent, residual checks included), ``seconds``,
    ``converged`` (False when the product budget ran out first: the value is then rough) and
    ``warm_started``. ``thresholds`` holds the stability lines at this step: ``"2/lr"`` and,
    with an Adam-type optimiser, ``"adam"`` = ``(2 + 2 beta1) / ((1 - beta1) lr)``.
    """

    step: int
    values: dict[str, list[float]] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    residuals: dict[str, list[float]] = field(default_factory=dict)
    num_matvecs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    warm_started: dict[str, bool] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """Whether every quantity of this check met its tolerance within its budget."""
        return all(self.converged.values())

    @property
    def total_matvecs(self) -> int:
        return sum(self.num_matvecs.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def scalars(self, prefix: str = "curvature/") -> dict[str, float]:
        """Flat ``{name: number}`` for loggers: the first value of each quantity as
        ``prefix + name`` (further eigenvalues as ``name_2``, ...), trace standard errors,
        thresholds, products and seconds of the check, and 0/1 for convergence."""
        flat: dict[str, float] = {}
        for name, values in self.values.items():
            for index, value in enumerate(values):
                suffix = "" if index == 0 else f"_{index + 1}"
                flat[f"{prefix}{name}{suffix}"] = float(value)
        for name, error in self.stderr.items():
            flat[f"{prefix}{name}_stderr"] = float(error)
        for name, value in self.thresholds.items():
            flat[f"{prefix}threshold_{_key(name)}"] = float(value)
        flat[f"{prefix}matvecs"] = float(self.total_matvecs)
        flat[f"{prefix}seconds"] = float(self.total_seconds)
        flat[f"{prefix}converged"] = float(self.all_converged)
        return flat

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckRecord:
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown or "step" not in data:
            raise ValueError(
                f"not a curvature check record: unknown keys {sorted(unknown)} or no 'step'; "
                "was the file written by CurvatureMonitor.save?"
            )
        return cls(**data)


def _key(name: str) -> str:
    return name.replace("/", "_over_")


def save_history(records: list[CheckRecord], path: str | os.PathLike[str]) -> None:
    """Write ``records`` as JSON (non-finite numbers as the strings "NaN"/"Infinity")."""
    payload = {
        "format": HISTORY_FORMAT,
        "version": HISTORY_VERSION,
        "records": [_finite_json(record.to_dict()) for record in records],
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=1, allow_nan=False)


def load_history(path: str | os.PathLike[str]) -> list[CheckRecord]:
    """The records written by :func:`save_history`; ValueError for any other JSON."""
    with open(path, encoding="utf-8") as file:
        payload = json.load(file)
    if not isinstance(payload, dict) or payload.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a curvature history written by save()")
    if payload.get("version") != HISTORY_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has history version {payload.get('version')!r}; this "
            f"torch-linop reads version {HISTORY_VERSION}"
        )
    return [CheckRecord.from_dict(_float_json(record)) for record in payload["records"]]


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_json(value: Any) -> Any:
    """Strict JSON: NaN and infinities become strings, restored by :func:`_float_json`."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def _float_json(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {key: _float_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_float_json(item) for item in value]
    return value
