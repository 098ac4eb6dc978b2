"""Hutch++ trace, Hutchinson diagonal and SLQ spectral density on sharded vectors (FSDP2
operators).

The algorithms are those of ``torch_linop.solvers.trace(method="hutch++"|"hutchinson")`` and
``torch_linop.solvers.spectral_density``, step for step, with the same probes: each probe's key
is drawn from the seed as the single-process solver draws it, and each rank generates only its
entries of the probe. So a sharded run gives the single-process numbers on the same operator (to
rounding), and no rank ever holds a full vector. Inner products, norms and the Hutch++ sketch's
QR (TSQR) are reduced over ranks, so every rank takes the same steps.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from torch_linop.distributed import sharded_linalg as sl
from torch_linop.distributed._collectives import check_finite_on_all_ranks
from torch_linop.distributed.seeds import rank_consistent_seed
from torch_linop.solvers._random import check_distribution, make_generator
from torch_linop.solvers._validation import check_int
from torch_linop.solvers.results import DiagonalResult, SpectralDensityResult, TraceResult
from torch_linop.solvers.slq import _smoothed_density, check_density_options

ShardedTraceMethod = Literal["hutch++", "hutchinson"]
_MIN_MATVECS = {"hutch++": 4, "hutchinson": 2}


def _generator(op: Any, seed: int | torch.Generator | None) -> torch.Generator:
    return make_generator(rank_consistent_seed(seed, op))


def _apply(op: Any, columns: Tensor, block_size: int | None) -> Tensor:
    """``op @ columns`` (this rank's rows), ``block_size`` columns at a time."""
    if columns.shape[1] == 0:
        return columns.clone()
    step = block_size or columns.shape[1]
    products = []
    for chunk in columns.split(step, dim=1):
        product = op.apply(chunk.to(op.torch_dtype).contiguous()).to(columns.dtype)
        products.append(product)
    return torch.cat(products, dim=1)


def _check_finite(op: Any, block: Tensor, what: str) -> None:
    check_finite_on_all_ranks(
        block,
        op.group,
        f"the sharded operator returned non-finite values (nan/inf) in {what}; check the "
        "model/loss for overflow or nan parameters",
        FloatingPointError,
    )


def sharded_trace(
    op: Any,
    num_matvecs: int,
    *,
    method: ShardedTraceMethod = "hutch++",
    distribution: sl.Distribution = "rademacher",
    seed: int | torch.Generator | None = None,
    block_size: int | None = None,
) -> TraceResult:
    """Estimate ``tr(op)`` of a sharded operator with exactly ``num_matvecs`` products, with a
    standard error: ``torch_linop.solvers.trace`` on sharded vectors.

    "hutch++" (Meyer et al. 2021): a sketch of ``s = num_matvecs // 3`` probes, ``Q = orth(H S)``
    by TSQR, the exact ``tr(Q^T H Q)`` (``s`` products), and Hutchinson on
    ``(I - QQ^T) H (I - QQ^T)`` with the other probes. "hutchinson": the mean of ``z^T H z``.
    The same ``seed`` gives the same probes, hence the same estimate, as the single-process
    solver on the unsharded operator. ``seed=None``: one fresh seed drawn on rank 0 and broadcast.
    ``block_size``: columns multiplied (and Hutchinson probes drawn) at a time; memory per rank is
    ``3 s + block_size`` local columns.
    """
    if method not in _MIN_MATVECS:
        raise ValueError(f"method must be one of {tuple(_MIN_MATVECS)}, got {method!r}")
    check_int("num_matvecs", num_matvecs, _MIN_MATVECS[method])
    check_distribution(distribution)
    if block_size is not None:
        check_int("block_size", block_size, 1)
    size = int(op.shape[0])
    sketch_size = num_matvecs // 3 if method == "hutch++" else 0
    if sketch_size > size:
        raise ValueError(
            f"num_matvecs={num_matvecs} gives a Hutch++ sketch of {sketch_size} vectors, more "
            f"than the operator size n={size}; use at most {3 * size + 2} products"
        )
    dtype = torch.float64 if op.torch_dtype == torch.float64 else torch.float32
    generator = _generator(op, seed)

    sketched_trace = 0.0
    basis = torch.zeros(op.local_size, 0, dtype=dtype, device=op.device)
    if sketch_size:
        sketch = sl.local_probes(op, sketch_size, generator, distribution, dtype)
        images = _apply(op, sketch, block_size)
        _check_finite(op, images, "the Hutch++ sketch")
        del sketch
        basis = sl.tall_skinny_qr(op, images)
        del images
        products = _apply(op, basis, block_size)
        _check_finite(op, products, "the Hutch++ sketch")
        sketched_trace = float(sl.all_reduce(op, (basis * products).sum().double().reshape(1))[0])
        del products

    num_probes = num_matvecs - 2 * sketch_size
    samples: list[Tensor] = []
    remaining = num_probes
    while remaining > 0:
        count = min(remaining, block_size or remaining)
        probes = sl.local_probes(op, count, generator, distribution, dtype)
        if sketch_size:
            probes = probes - basis @ sl.dot(op, basis, probes)
        products = _apply(op, probes, block_size)
        _check_finite(op, products, "the Hutchinson probes")
        samples.append(sl.column_sums(op, (probes * products).double()))
        remaining -= count
    values = torch.cat(samples).cpu().numpy()
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / math.sqrt(len(values)))
    return TraceResult(sketched_trace + mean, stderr, num_matvecs, method)


def sharded_diagonal(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | torch.Generator | None = None,
    block_size: int | None = None,
) -> DiagonalResult:
    """Estimate this rank's part of ``diag(op)`` with an entrywise standard error, from
    ``num_matvecs`` Rademacher probes: ``torch_linop.solvers.diagonal(method="hutchinson")`` on
    sharded vectors (the same probes for the same ``seed``, so each rank's part equals the
    matching entries of the single-process estimate). Everything but the products is local: the
    estimate never leaves its rank; ``op.full_vector`` gathers it where a full one is wanted.
    ``seed=None``: one fresh seed drawn on rank 0 and broadcast.
    """
    check_int("num_matvecs", num_matvecs, 2)
    if block_size is not None:
        check_int("block_size", block_size, 1)
    dtype = torch.float64 if op.torch_dtype == torch.float64 else torch.float32
    generator = _generator(op, seed)
    count_so_far = 0
    mean = m2 = torch.zeros(op.local_size, dtype=dtype, device=op.device)
    remaining = num_matvecs
    while remaining > 0:
        count = min(remaining, block_size or remaining)
        probes = sl.local_probes(op, count, generator, "rademacher", dtype)
        products = _apply(op, probes, block_size)
        _check_finite(op, products, "the diagonal probes")
        samples = (probes * products).T  # (count, local_size)
        # the single-process solvers' streaming update (Chan et al.), entrywise
        block_mean = samples.mean(dim=0)
        block_m2 = ((samples - block_mean) ** 2).sum(dim=0)
        total = count_so_far + count
        delta = block_mean - mean
        mean = mean + delta * (count / total)
        m2 = m2 + block_m2 + delta**2 * (count_so_far * count / total)
        count_so_far = total
        remaining -= count
    stderr = (m2 / (count_so_far - 1) / count_so_far).sqrt()
    return DiagonalResult(mean, stderr, num_matvecs, "hutchinson")


def sharded_spectral_density(
    op: Any,
    *,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int | torch.Generator | None = None,
) -> SpectralDensityResult:
    """SLQ eigenvalue density of a sharded symmetric operator (``num_runs * lanczos_steps``
    products): ``torch_linop.solvers.spectral_density`` on sharded vectors.

    Each run starts from a Rademacher probe (the single-process solver's probe for the same
    ``seed``), takes ``lanczos_steps`` Lanczos steps with full reorthogonalisation (the basis
    costs ``(lanczos_steps + 1) * local_size`` entries per rank), and contributes the Ritz values
    as nodes and the squared first components of the Ritz vectors as weights. A run whose Krylov
    space became invariant (a coupling below ``64 eps`` times the largest coefficient seen) is cut
    there, with zero weights for the rest, as in the single-process solver. ``sigma`` (default:
    node range / ``lanczos_steps``) is the Gaussian smoothing width. ``seed=None``: one fresh seed
    drawn on rank 0 and broadcast.
    """
    size = int(op.shape[0])
    check_density_options(size, num_runs, lanczos_steps, grid_size, sigma)
    generator = _generator(op, seed)
    lanczos = _ShardedLanczos(op, capacity=min(size, lanczos_steps + 1), generator=generator)
    nodes = np.zeros((num_runs, lanczos_steps))
    weights = np.zeros((num_runs, lanczos_steps))
    for run in range(num_runs):
        lanczos.reset(sl.local_probes(op, 1, generator, "rademacher", lanczos.dtype)[:, 0])
        while lanczos.num_multiplied < lanczos_steps and lanczos.can_step():
            lanczos.step()
        lanczos.validate()
        run_nodes, run_weights = lanczos.quadrature()
        nodes[run, : len(run_nodes)] = run_nodes
        nodes[run, len(run_nodes) :] = run_nodes[-1]
        weights[run, : len(run_weights)] = run_weights
    grid, density, width = _smoothed_density(nodes, weights, grid_size, sigma, lanczos_steps)
    return SpectralDensityResult(grid, density, nodes, weights, width, lanczos.num_matvecs)


class _ShardedLanczos:
    """Single-vector Lanczos with full reorthogonalisation on sharded rows, the bookkeeping of
    ``torch_linop.solvers.krylov`` (coefficient matrix, breakdown check after the run, the
    norm estimate kept across runs), so SLQ runs match the single-process ones."""

    def __init__(self, op: Any, *, capacity: int, generator: torch.Generator) -> None:
        self.op = op
        self.dtype = torch.float64 if op.torch_dtype == torch.float64 else torch.float32
        self.size_n = int(op.shape[0])
        self.generator = generator
        self.basis = torch.zeros(capacity, op.local_size, dtype=self.dtype, device=op.device)
        self.coefficients = torch.zeros(capacity, capacity, dtype=self.dtype)
        self.size = 0
        self.complete = False
        self.num_matvecs = 0
        self.norm_estimate = 0.0

    @property
    def capacity(self) -> int:
        return self.basis.shape[0]

    @property
    def num_multiplied(self) -> int:
        return self.size if self.complete else self.size - 1

    def reset(self, start: Tensor) -> None:
        self.basis.zero_()
        self.coefficients.zero_()
        norm = float(sl.dot(self.op, start[:, None], start[:, None]).sqrt())
        self.basis[0] = start / norm
        self.size = 1
        self.complete = False

    def can_step(self) -> bool:
        if self.complete:
            return False
        return self.size + 1 <= self.capacity or self.size == self.size_n

    def step(self) -> None:
        """Multiply the pending vector, Gram-Schmidt twice against the basis, normalise."""
        size, op = self.size, self.op
        pending = self.basis[size - 1]
        product = op.apply(pending.to(op.torch_dtype)[:, None])[:, 0].to(self.dtype)
        self.num_matvecs += 1
        active = self.basis[:size]
        coefficients = sl.dot(op, active.T, product[:, None])[:, 0]
        product = product - active.T @ coefficients
        correction = sl.dot(op, active.T, product[:, None])[:, 0]
        product = product - active.T @ correction
        self.coefficients[:size, size - 1] = (coefficients + correction).cpu()
        if size == self.size_n:
            self.complete = True
            return
        largest = sl.max_abs(op, product)
        _, exponent = torch.frexp(largest)
        scale = torch.ldexp(torch.ones_like(largest), exponent - 1)
        product = product / scale
        norm = sl.dot(op, product[:, None], product[:, None])[0, 0].sqrt()
        product = product / norm.clamp_min(torch.finfo(self.dtype).tiny)
        self.basis[size] = product
        self.coefficients[size, size - 1] = float(norm * scale)
        self.size = size + 1

    def validate(self) -> None:
        """Raise on non-finite coefficients; cut the run at the first breakdown (a coupling of
        at most ``64 eps * norm_estimate``), advancing the generator past the random direction
        the single-process solver draws there."""
        m = self.num_multiplied
        columns = self.coefficients[: self.size, :m].double().numpy()
        if not np.isfinite(columns).all():
            raise FloatingPointError(
                f"the sharded operator returned non-finite values (nan/inf) within the first "
                f"{self.num_matvecs} products; check the model/loss for overflow or nan "
                "parameters"
            )
        self.norm_estimate = max(self.norm_estimate, float(np.abs(columns).max(initial=0.0)))
        threshold = 64 * torch.finfo(self.dtype).eps * self.norm_estimate
        for column in range(m):
            if column + 2 > self.size:
                break
            if abs(columns[column + 1, column]) <= threshold:
                sl.skip_probes(self.generator, 1)
                self.coefficients[:, column + 1 :] = 0
                self.coefficients[column + 2 :] = 0
                self.size = column + 2
                self.complete = False
                return

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the squared first components of their vectors."""
        m = self.num_multiplied
        projected = self.coefficients[: self.size, :m].double().numpy().copy()
        largest = float(np.abs(projected).max(initial=0.0))
        scale = float(np.ldexp(1.0, np.frexp(largest)[1] - 1)) if np.isfinite(largest) else 1.0
        head = torch.from_numpy(projected[:m] / scale)
        values, vectors = (x.numpy() for x in torch.linalg.eigh((head + head.T) / 2))
        run_weights = vectors[0] ** 2
        return values * scale, run_weights / run_weights.sum()
