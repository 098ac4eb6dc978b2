"""The vector space an operator's vectors live in: the one hook through which the solvers take
inner products, norms, QR factorisations, probes and seeds.

An operator may carry an optional ``vector_space`` attribute (absent or None: whole vectors in
this process, :class:`LocalSpace`). A sharded operator (FSDP2) gives each process its rows of
every vector; its space all-reduces the local inner products, so every process gets the same
scalars and takes the same steps, and the solvers run unchanged on it. A data-parallel operator
keeps whole vectors on every process; its space only makes seeds agree.

Every method is a collective for a distributed space: all processes call it, in the same order,
with their parts of the same vectors (the solvers do, since they take the same steps).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._memory import tall_qr

Reduction = Literal["sum", "max"]
Seed = int | torch.Generator | None


@runtime_checkable
class VectorSpace(Protocol):
    """What a solver needs to know about where an operator's vectors live: the required part.

    ``inner`` and ``shared_seed`` are required. A space whose processes hold only some entries
    of each vector (sharded) also provides, as methods:

    - ``reduce(partial, op)``: the elementwise ``"sum"`` or ``"max"`` over the processes of a
      small per-process result, identical on every process (default: the identity);
    - ``qr(block)``: thin QR of the whole ``(n, s)`` block, as this process's rows of ``Q`` and
      the ``(s, s)`` factor ``R``, the same on every process (default: a local QR);
    - ``local_entries()``: the ranges ``[start, stop)`` of a full vector's entries this process
      holds, in the order of its rows (default: all of them); probes are drawn for these only;
    - ``rank`` and ``world_size`` (attributes): this process's index among the ``world_size``
      processes that share the vectors (default: 0 of 1). A space with ``world_size > 1`` has
      each process checkpoint its own part to its own file (``solvers.checkpoint``).

    ``inner(x, y)`` must equal ``reduce(x.T @ y, "sum")``.
    """

    def inner(self, x: Tensor, y: Tensor) -> Tensor:
        """``x.T @ y`` over the whole vectors, ``(kx, ky)``, identical on every process."""
        ...

    def shared_seed(self, seed: Seed) -> Seed:
        """``seed`` as every process must use it: None becomes one fresh seed for all processes;
        a generator must be in the same state everywhere (ValueError otherwise). A collective
        for a distributed space."""
        ...


class LocalSpace:
    """Whole vectors in this process: plain inner products, seeds used as given."""

    def inner(self, x: Tensor, y: Tensor) -> Tensor:
        return x.T @ y

    def shared_seed(self, seed: Seed) -> Seed:
        return seed


class Space:
    """The solvers' view of an operator's vector space: the optional methods filled in with
    their whole-vector defaults, and the norms, sums and checks derived from them."""

    def __init__(self, space: VectorSpace, size: int) -> None:
        self.space = space
        self.size = size
        self.inner = space.inner
        self.shared_seed = space.shared_seed
        self._reduce = getattr(space, "reduce", None)
        self._qr = getattr(space, "qr", None)
        self.rank = int(getattr(space, "rank", 0))
        self.world_size = int(getattr(space, "world_size", 1))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"{type(space).__name__} says it is rank {self.rank} of world_size "
                f"{self.world_size}; a rank is in 0..world_size-1"
            )
        local_entries = getattr(space, "local_entries", None)
        entries = [(0, size)] if local_entries is None else list(local_entries())
        self.entries = tuple((int(start), int(stop)) for start, stop in entries)
        for start, stop in self.entries:
            if not 0 <= start <= stop <= size:
                raise ValueError(
                    f"{type(space).__name__}.local_entries() holds the range [{start}, {stop}), "
                    f"outside the operator's {size} entries"
                )
        self.length = sum(stop - start for start, stop in self.entries)
        if self.length != size and (self._reduce is None or self._qr is None):
            raise TypeError(
                f"{type(space).__name__} holds {self.length} of the {size} entries of each "
                "vector here but lacks reduce(partial, op) and qr(block): a space of partial "
                "vectors must combine the processes' parts"
            )

    def reduce(self, partial: Tensor, op: Reduction) -> Tensor:
        return partial if self._reduce is None else self._reduce(partial, op)

    def qr(self, block: Tensor) -> tuple[Tensor, Tensor]:
        """Householder QR of the whole block (the Lanczos steps; exact for nearly dependent
        columns)."""
        return torch.linalg.qr(block) if self._qr is None else self._qr(block)

    def tall_qr(self, block: Tensor) -> tuple[Tensor, Tensor]:
        """Thin QR of a sketch, also for n in the billions (:func:`._memory.tall_qr`)."""
        return tall_qr(block) if self._qr is None else self._qr(block)

    def power_of_two_scale(self, rows: Tensor) -> Tensor:
        """Per row of ``rows`` (``(k, length)``, whole vectors as rows), a power of two within a
        factor 2 below the row's largest entry over all processes, shape ``(k, 1)``: dividing
        by it is exact, and squares of the quotient can neither underflow nor overflow."""
        if rows.shape[1] == 0:  # a process holding no entries adds nothing to the maximum
            largest = rows.new_zeros(rows.shape[0])
        else:
            largest = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1)
        largest = self.reduce(largest, "max")
        _, exponent = torch.frexp(largest)
        return torch.ldexp(torch.ones_like(largest), exponent - 1)[:, None]

    def row_norms(self, rows: Tensor) -> Tensor:
        """``(k,)`` Euclidean norms of whole vectors given as rows ``(k, length)``, correct also
        where the plain sum of squares would underflow or overflow (norms near 1e-160)."""
        scale = self.power_of_two_scale(rows)
        scaled = rows / scale
        squares = self.reduce((scaled * scaled).sum(dim=1), "sum")
        return squares.sqrt() * scale[:, 0]

    def vector_norm(self, vector: Tensor) -> Tensor:
        """The (0-d) norm of one whole vector ``(length,)``."""
        return self.row_norms(vector[None])[0]

    def column_sums(self, block: Tensor) -> Tensor:
        """``(k,)`` sums over all entries of each column of ``(length, k)``."""
        return self.reduce(block.sum(dim=0), "sum")

    def agreed_min(self, value: int | None) -> int | None:
        """The smallest ``value`` over the processes (None stays None: no cap anywhere), so
        that sizes derived from each process's free memory are the same on all of them."""
        if value is None or self._reduce is None:
            return value
        negated = torch.tensor([-float(value)], dtype=torch.float64)
        return -int(self.reduce(negated, "max")[0])

    def gather(self, row: Tensor) -> Tensor:
        """``(world_size, m)``: every process's ``(m,)`` float64 ``row``, the same on all (one
        sum-reduction of a table holding this process's row only)."""
        table = torch.zeros(self.world_size, row.shape[0], dtype=torch.float64)
        table[self.rank] = row.to(torch.float64)
        return self.reduce(table, "sum") if self.world_size > 1 else table

    def all_finite(self, block: Tensor) -> bool:
        """Whether ``block`` is finite on every process (one reduction, the same answer on all,
        so all raise together and none is left waiting in its next collective)."""
        if self._reduce is None:
            return bool(torch.isfinite(block).all())
        bad = (~torch.isfinite(block)).any().to(torch.float64).reshape(1)
        return not bool(self.reduce(bad, "max")[0] > 0)


def space_of(op: object, size: int) -> Space:
    """The solvers' view of ``op.vector_space`` (whole local vectors when absent or None);
    TypeError naming what is missing."""
    space = getattr(op, "vector_space", None)
    if space is None:
        return Space(LocalSpace(), size)
    missing = [
        name for name in ("inner", "shared_seed") if not callable(getattr(space, name, None))
    ]
    if missing:
        raise TypeError(
            f"{type(op).__name__}.vector_space ({type(space).__name__}) lacks {missing}; a "
            "vector space needs inner(x, y) and shared_seed(seed), and for sharded vectors "
            "reduce(partial, op), qr(block) and local_entries() (or set vector_space = None "
            "for whole local vectors)"
        )
    return Space(space, size)
