"""One adapter module per library, each answering the same questions with the library's own
routines: a curvature matvec on a ``Problem`` (``make_matvec``), the top-k eigenvalues
(``top_eigenvalues``), a trace estimate at a matvec budget (``estimate_trace``) and a spectral
density (``spectral_density``). A routine the library does not offer raises ``Unsupported`` with
the reason, which the tables print.

Every adapter module defines ``LABEL`` (the table name), ``version()`` (imports the library;
``ImportError`` when it is not installed), ``MUTATES_MODEL`` (the suites then hand it a deep
copy of the model) and any of the four routines above.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

PEER_NAMES = ("ours", "autograd", "curvlinops", "hessian_eigenthings", "pyhessian", "backpack")
CURVATURES = ("hessian", "ggn", "ef")
CURVATURE_LABELS = {"hessian": "Hessian", "ggn": "GGN", "ef": "empirical Fisher"}

MatvecFn = Callable[[torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The library has no routine for this request; the message says why."""


@dataclass
class EigenOutcome:
    """Top eigenvalues (descending) and the matvecs spent to get them."""

    eigenvalues: np.ndarray
    num_matvecs: int
    note: str = ""


@dataclass
class TraceOutcome:
    """A trace estimate and the matvecs it consumed."""

    estimate: float
    num_matvecs: int
    note: str = ""


@dataclass
class DensityOutcome:
    """A spectral density as quadrature nodes/weights (weights sum to 1) and/or as a density on
    a grid, plus the matvecs spent."""

    num_matvecs: int
    nodes: np.ndarray | None = None
    weights: np.ndarray | None = None
    grid: np.ndarray | None = None
    density: np.ndarray | None = None
    note: str = ""


@dataclass
class MatvecCounter:
    """Counts matrix-vector products (a k-column block counts k)."""

    count: int = 0

    def add(self, columns: int) -> None:
        self.count += int(columns)


@dataclass
class Peer:
    """A library as the suites see it: its adapter module, or why it is unavailable."""

    name: str
    label: str
    version: str | None
    module: ModuleType | None
    missing: str | None = None
    mutates_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.module is not None

    def routine(self, name: str) -> Callable[..., Any]:
        """The adapter's routine ``name``; Unsupported when the library does not offer it."""
        if self.module is None:
            raise Unsupported(self.missing or "not installed")
        function = getattr(self.module, name, None)
        if function is None:
            raise Unsupported(f"{self.label} offers no {name.replace('_', ' ')} routine")
        return function


def load_peers(names: list[str] | None = None) -> list[Peer]:
    """Import the adapters for ``names`` (default: all). A library that fails to import is kept
    as an unavailable ``Peer`` whose ``missing`` says why, so tables can say it was skipped."""
    peers = []
    for name in names or list(PEER_NAMES):
        if name not in PEER_NAMES:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")
        adapter = importlib.import_module(f"benchmarks.peers.{name}")
        try:
            version = adapter.version()
        except ImportError as error:
            peers.append(Peer(name, adapter.LABEL, None, None, missing=f"not installed ({error})"))
            continue
        except Exception as error:  # a broken install: skip it, but say so
            peers.append(
                Peer(
                    name,
                    adapter.LABEL,
                    None,
                    None,
                    missing=f"fails to import: {type(error).__name__}: {error}",
                )
            )
            continue
        peers.append(
            Peer(
                name,
                adapter.LABEL,
                version,
                adapter,
                mutates_model=bool(getattr(adapter, "MUTATES_MODEL", False)),
            )
        )
    return peers


def flat(tensors: Any) -> torch.Tensor:
    """Concatenate per-parameter tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def split(vector: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``params``."""
    pieces = torch.split(vector, [p.numel() for p in params])
    return [piece.view_as(p) for piece, p in zip(pieces, params)]


def seed_everything(seed: int) -> None:
    """Seed torch's global generators, for libraries that draw from them (no generator arg)."""
    torch.manual_seed(seed)
