"""Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation, run until
the k pairs converge, with thick restart when the basis would outgrow ``max_basis``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import krylov
from ._memory import default_block_size, device_budget, fits_on_device, vector_bytes
from ._operator import Operator, as_operator, check_finite
from ._progress import progress_bar
from ._random import make_generator
from ._validation import as_device, check_bool, check_int, check_tol
from .checkpoint import Checkpoint, seed_option
from .results import EigenResult

Which = Literal["LM", "LA", "SA", "BE"]
WHICH = ("LM", "LA", "SA", "BE")
_FIRST_CHECK_INTERVAL = 4
_MAX_CHECK_INTERVAL = 16
_HINT_MATVECS = 2  # products an unconverged run spends on checking that the matrix stays put


def default_tol(eps: float) -> float:
    """Default residual tolerance for an operator with machine epsilon ``eps``: ``eps**(2/3)``
    (2.4e-5 for float32, 0.04 for bf16), but 1e-10 for float64, safely above rounding noise."""
    return max(1e-10, eps ** (2 / 3))


def lanczos(
    op: Any,
    k: int,
    *,
    which: Which = "LM",
    tol: float | None = None,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    max_basis_bytes: int | None = None,
    block_size: int = 1,
    seed: int | torch.Generator | None = None,
    return_eigenvectors: bool = True,
    basis_device: str | torch.device | None = None,
    basis_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    start_block: Tensor | None = None,
    verify: bool = False,
    check_every: int | None = None,
) -> EigenResult:
    """The ``k`` eigenpairs of symmetric ``op`` selected by ``which``, converged to ``tol``.

    ``which``: "LM" largest magnitude, "LA" largest algebraic, "SA" smallest algebraic, "BE"
    both ends (``k // 2`` from the bottom, the rest from the top). A pair is converged when
    ``||H v - lambda v|| <= tol * ||H||`` (``||H||`` estimated by the largest |Ritz value|), which
    bounds the eigenvalue error by the same amount; the default ``tol`` is ``1e-10`` in float64
    and ``eps**(2/3)`` in lower precisions (of the operator or the basis, whichever is coarser).

    Residuals come from the Lanczos relation ``H Q_m = Q_m T_m + Q_next B_m E_m^T``: the residual
    of the Ritz pair ``(theta, Q_m s)`` is ``||B_m s_last||`` (``|beta_m s_m|`` for single
    vectors), read from ``T`` at no cost. The basis is fully reorthogonalised, so this is the
    true residual ``||H v - theta v||`` of the products as computed, up to rounding (about
    ``eps * ||H||`` of the basis dtype), and ``num_matvecs`` counts only the Krylov products (plus
    two after an unconverged run, which checks whether the matrix changes between products, all
    of it everything the operator saw). What the relation
    cannot see is a matrix that changes between products (dropout, a shuffled loader) or noise
    in the products themselves (bf16): ``verify=True`` measures ``||H v - theta v||`` with one
    extra product per returned pair (counted in ``num_matvecs`` and ``num_residual_matvecs``) and
    keeps iterating while those fail. ``residuals_are_true`` on the result says which kind was
    returned. ``return_eigenvectors=False`` returns the eigenvalues only.

    Convergence is checked (one host sync and a small tridiagonal eigensolve, no products) on an
    adaptive schedule: first after ``ceil((k + 1) / block_size)`` block steps, then at intervals
    predicted from the convergence rate. ``check_every=c`` checks every ``c`` block steps
    instead, so the run stops within ``c`` steps of the first step that meets ``tol``: ``1``
    suits warm starts (``start_block`` near the answer), which may need only one or two steps.

    The basis holds at most ``max_basis`` vectors (default ``min(n, max(100, 4 k))``, further
    capped by ``max_basis_bytes``); beyond it the run thick-restarts. ``basis_device`` /
    ``basis_dtype`` store it elsewhere (e.g. "cpu") or in another precision; the projected problem
    is always solved in float64. ``max_matvecs`` caps the Krylov products (default
    ``max(1000, 20 * max_basis)``); an unconverged result warns. Single-vector Lanczos (like
    ARPACK) finds one copy of a repeated eigenvalue per start vector unless the basis becomes
    invariant: use ``block_size >= multiplicity`` when eigenvalues may repeat. A thick restart
    needs room: below about ``max_basis = k + 4 * block_size`` each cycle takes a single block
    step and convergence slows down (tiny operators with large blocks).

    ``checkpoint`` (a file path) makes the run resumable: it resumes from the file if it exists
    and saves its state there every ``checkpoint_every`` products and/or ``checkpoint_seconds``
    seconds (default 300 s); a resumed run gives bit-identical results (see
    :mod:`torch_linop.solvers.checkpoint`). Resuming with other options or another operator
    raises ValueError.
    """
    operator = as_operator(op)
    n = operator.size
    check_int("k", k, 1)
    if k >= n:
        raise ValueError(
            f"k={k} must be smaller than the operator size n={n}; for all eigenvalues of a small "
            "operator form the matrix and call numpy.linalg.eigh"
        )
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    check_int("block_size", block_size, 1)
    check_bool("return_eigenvectors", return_eigenvectors)
    check_bool("verify", verify)
    if check_every is not None:
        check_int("check_every", check_every, 1)
    basis_device = (
        operator.device if basis_device is None else as_device("basis_device", basis_device)
    )
    basis_dtype = operator.dtype if basis_dtype is None else basis_dtype
    if not (isinstance(basis_dtype, torch.dtype) and basis_dtype.is_floating_point):
        raise TypeError(f"basis_dtype must be a floating torch.dtype, got {basis_dtype!r}")
    if tol is None:
        tol = default_tol(max(operator.eps, torch.finfo(basis_dtype).eps))
    check_tol(tol)
    if max_basis_bytes is None:  # on a GPU: what fits in free memory, leaving room for results
        budget = device_budget(basis_device)
        if budget is not None:
            # no room is set aside for the k eigenvectors: the residual check forms them a
            # block at a time and the final ones go through the host if they do not fit;
            # sharded: the rows that fit on every process
            row_bytes = max(1, operator.length) * torch.finfo(basis_dtype).bits // 8
            rows = operator.space.agreed_min(budget // row_bytes)
            max_basis_bytes = None if rows is None else rows * row_bytes
    capacity = _capacity(
        n, k, block_size, max_basis, max_basis_bytes, basis_dtype, length=operator.length
    )
    if max_matvecs is None:
        max_matvecs = max(1000, 20 * capacity)
    check_int("max_matvecs", max_matvecs, k)

    if start_block is not None:
        _check_start_block(start_block, n, block_size, checkpoint)
    generator = make_generator(operator.space.shared_seed(seed))
    options: dict[str, Any] = {
        "k": k,
        "which": which,
        "tol": tol,
        "max_matvecs": max_matvecs,
        "max_basis": capacity,
        "block_size": block_size,
        "seed": seed_option(seed),
        "return_eigenvectors": return_eigenvectors,
        "verify": verify,
        "basis_dtype": basis_dtype,
    }
    if check_every is not None:  # only when set: checkpoints written without it still resume
        options["check_every"] = check_every
    saver = Checkpoint(
        checkpoint,
        solver="lanczos",
        options=options,
        op=op,
        operator=operator,
        every_matvecs=checkpoint_every,
        every_seconds=checkpoint_seconds,
    )
    saved = saver.load()
    acc_dtype = krylov.accumulation_dtype(basis_dtype, operator.dtype)
    if saved is None:
        if start_block is None:
            start_block = operator.probes(
                block_size, generator, "gaussian", dtype=acc_dtype, device=basis_device
            )
        else:
            start_block = start_block.to(device=basis_device, dtype=acc_dtype)
        state = krylov.start(
            operator,
            start_block,
            capacity=capacity,
            generator=generator,
            basis_device=basis_device,
            basis_dtype=basis_dtype,
        )
    else:
        state = krylov.allocate(
            operator,
            n,
            block_size,
            capacity=capacity,
            generator=generator,
            basis_device=basis_device,
            basis_dtype=basis_dtype,
        )
        krylov.load_state_dict(state, saved["krylov"])
    run = _Run(
        operator, state, k, which, tol, max_matvecs, return_eigenvectors, verify, saver, check_every
    )
    if saved is not None:
        run.load_state_dict(saved["run"])
    with progress_bar(f"lanczos top-{k} {which}", None, progress) as bar:
        run.bar = bar
        result = run.solve()
    if not result.converged.all():
        hint = _irreproducible_hint(operator, tol)
        warnings.warn(
            f"lanczos: {int(result.converged.sum())} of {k} eigenpairs converged to "
            f"tol={tol:g} within {result.num_matvecs} matvecs (largest residual "
            f"{result.residuals.max():.3g}, threshold {tol * result.norm_estimate:.3g}); raise "
            "max_matvecs (or max_basis), or loosen tol" + hint,
            RuntimeWarning,
            stacklevel=2,
        )
        # the hint's products are counted too: num_matvecs is everything the operator saw
        result = dataclasses.replace(
            result,
            num_matvecs=result.num_matvecs + _HINT_MATVECS,
            num_residual_matvecs=result.num_residual_matvecs + _HINT_MATVECS,
        )
    return result


def _irreproducible_hint(operator: Operator, tol: float) -> str:
    """After a failed run, two products (``_HINT_MATVECS``) of one seeded vector: if they differ
    by more than ``tol``, the matrix moved between products and no budget would help."""
    probe = torch.randn(operator.size, 1, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=operator.device, dtype=operator.dtype)
    first, second = operator.matmat(probe).double(), operator.matmat(probe).double()
    change = float((first - second).norm() / first.norm().clamp_min(1e-300))
    if change <= max(tol, 100 * operator.eps):
        return ""
    return (
        f". But first: two products of the same vector differ by {change:.2g} (relative), so "
        "the matrix changes between products: the model or data is non-deterministic (dropout "
        "or BatchNorm in train mode: model.eval(); a shuffled DataLoader: shuffle=False)"
    )


class _Run:
    """The convergence loop: step without host syncs, check at predicted intervals, restart."""

    def __init__(
        self,
        operator: Operator,
        state: krylov.KrylovState,
        k: int,
        which: str,
        tol: float,
        max_matvecs: int,
        return_eigenvectors: bool,
        verify: bool,
        checkpoint: Checkpoint,
        check_every: int | None = None,
    ) -> None:
        self.operator, self.state, self.k, self.which, self.tol = operator, state, k, which, tol
        self.max_matvecs, self.return_eigenvectors = max_matvecs, return_eigenvectors
        self.verify = verify
        self.checkpoint = checkpoint
        self.check_every = check_every  # None: the adaptive schedule of _next_interval
        # the schedule of convergence checks is part of the state: a resumed run checks (and
        # restarts) at the same steps as an uninterrupted one
        self.steps_until_check = (
            max(1, math.ceil((k + 1) / state.block_size)) if check_every is None else check_every
        )
        self.num_residual_matvecs = 0
        self.verify_after = 0  # Krylov matvecs before the next true-residual check is allowed
        self.history: list[tuple[int, float]] = []  # (steps, log of worst residual / threshold)
        self.bar: Any = None

    _SCHEDULE = ("steps_until_check", "num_residual_matvecs", "verify_after", "history")

    def state_dict(self) -> dict[str, Any]:
        """The run's state at a save point: the Krylov state and the check schedule."""
        schedule = {name: getattr(self, name) for name in self._SCHEDULE}
        schedule["history"] = [list(entry) for entry in self.history]
        return {"krylov": krylov.state_dict(self.state), "run": schedule}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.steps_until_check = int(saved["steps_until_check"])
        self.num_residual_matvecs = int(saved["num_residual_matvecs"])
        self.verify_after = int(saved["verify_after"])
        self.history = [(int(steps), float(ratio)) for steps, ratio in saved["history"]]

    def solve(self) -> EigenResult:
        state, block_size = self.state, self.state.block_size
        self.bar.update(state.num_matvecs + self.num_residual_matvecs)  # resumed products
        while True:
            self.checkpoint.maybe_save(
                state.num_matvecs + self.num_residual_matvecs, self.state_dict
            )
            # fewer than k Ritz pairs (breakdowns wasted products) overrides the budget
            budget_left = (
                state.num_matvecs + block_size <= self.max_matvecs or state.num_multiplied < self.k
            )
            if krylov.can_step(state) and budget_left and self.steps_until_check > 0:
                krylov.step(state, self.operator)
                self.bar.update(block_size)
                self.steps_until_check -= 1
                continue
            krylov.validate(state)
            values, coordinates, estimates = krylov.ritz(state)
            if len(values) < self.k:  # too few vectors yet (e.g. after a breakdown)
                self.steps_until_check = math.ceil((self.k - len(values)) / block_size)
                continue
            order = _target_order(values, self.which)
            wanted = order[: self.k]
            norm = float(np.abs(values).max())
            threshold = self.tol * norm
            worst = float(estimates[wanted].max())
            self.bar.set_postfix(
                converged=f"{int((estimates[wanted] <= threshold).sum())}/{self.k}"
            )
            finished = state.complete or not budget_left
            if worst <= threshold and state.num_matvecs >= self.verify_after or finished:
                result = self._result(values, coordinates, estimates, wanted, norm)
                if result.converged.all() or finished:
                    return result
                self.verify_after = state.num_matvecs + block_size * max(self.k, 8)
            if not krylov.can_step(state):
                num_keep = self.k + (state.capacity - self.k - 2 * block_size) // 2
                keep = order[:num_keep]
                krylov.thick_restart(state, coordinates[:, keep], values[keep])
            self.steps_until_check = self._next_interval(worst, threshold)

    def _next_interval(self, worst: float, threshold: float) -> int:
        """Steps until the next check: half of what the latest convergence rate predicts (so
        checks close in on the converging step), doubling while there is no progress yet, and
        at most an eighth of the steps so far."""
        state = self.state
        if worst <= threshold:
            return max(1, math.ceil((self.verify_after - state.num_matvecs) / state.block_size))
        if self.check_every is not None:
            return self.check_every
        log_ratio = math.log(worst / threshold) if threshold > 0 else math.inf
        self.history.append((state.num_steps, log_ratio))
        if len(self.history) < 2 or not math.isfinite(log_ratio):
            return _FIRST_CHECK_INTERVAL
        (previous_steps, previous_ratio), _ = self.history[-2], self.history[-1]
        interval = state.num_steps - previous_steps
        rate = (previous_ratio - log_ratio) / max(1, interval)
        # Lanczos convergence accelerates, so predictions run long: also never overshoot by
        # more than about 1/8 of the steps taken
        cap = min(_MAX_CHECK_INTERVAL, max(1, math.ceil(state.num_steps / 8)))
        if rate <= 0:
            return min(cap, 2 * interval)
        return int(min(cap, max(1, math.ceil(log_ratio / rate / 2))))

    def _result(
        self,
        values: np.ndarray,
        coordinates: np.ndarray,
        estimates: np.ndarray,
        wanted: np.ndarray,
        norm: float,
    ) -> EigenResult:
        state, operator = self.state, self.operator
        if self.which == "BE":
            wanted = wanted[np.argsort(values[wanted], kind="stable")]
        eigenvalues = values[wanted]
        eigenvectors: Any = None
        residuals = estimates[wanted]  # from the Lanczos relation, no product
        if self.verify:
            residuals = self._true_residuals(coordinates[:, wanted], eigenvalues)
        converged = residuals <= self.tol * norm
        returning = converged.all() or state.complete or not self._budget_left()
        if self.return_eigenvectors and returning:
            eigenvectors = operator.output(self._eigenvectors(coordinates[:, wanted]))
        return EigenResult(
            eigenvalues=eigenvalues.copy(),
            eigenvectors=eigenvectors,
            residuals=residuals.copy(),
            converged=converged,
            num_matvecs=state.num_matvecs + self.num_residual_matvecs,
            num_residual_matvecs=self.num_residual_matvecs,
            num_iterations=state.num_steps,
            num_restarts=state.num_restarts,
            tol=self.tol,
            norm_estimate=norm,
            residuals_are_true=self.verify,
        )

    def _budget_left(self) -> bool:
        state = self.state
        return state.num_matvecs + state.block_size <= self.max_matvecs or (
            state.num_multiplied < self.k
        )

    def _true_residuals(self, coordinates: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``||H v_i - theta_i v_i||`` for the unit Ritz vectors, formed a memory-sized block at
        a time (one vector of a 1B model), so the check needs no room for all k vectors."""
        operator, state = self.operator, self.state
        norms = []
        for rows in torch.arange(coordinates.shape[1]).split(
            default_block_size(operator.size, operator.dtype)
        ):
            vectors = krylov.ritz_vectors(state, coordinates[:, rows.numpy()]).to(operator.device)
            vectors /= operator.space.row_norms(vectors)[:, None]
            product = operator.matmat(vectors.T.to(operator.dtype))
            check_finite(product, state.num_matvecs + self.num_residual_matvecs, operator.space)
            self.num_residual_matvecs += len(rows)
            self.bar.update(len(rows))
            theta = torch.from_numpy(values[rows.numpy()]).to(vectors.device, vectors.dtype)
            residual_rows = product.T.to(vectors.dtype) - theta[:, None] * vectors
            norms.append(operator.space.row_norms(residual_rows))
            del product, residual_rows, vectors
        return torch.cat(norms).cpu().double().numpy()

    def _eigenvectors(self, coordinates: np.ndarray) -> Tensor:
        """The unit Ritz vectors ``(k, n)`` on the operator's device. When k more vectors do not
        fit next to the basis (a 1B model's basis fills the GPU), they are assembled on the host
        a column chunk at a time, the basis is released, and they move back."""
        state, device = self.state, self.operator.device
        k, n = coordinates.shape[1], state.basis.shape[1]
        acc_dtype = state.coefficients.dtype
        needed = k * vector_bytes(n, acc_dtype)
        if fits_on_device(device, needed):
            vectors = krylov.ritz_vectors(state, coordinates).to(device)
        else:
            vectors = krylov.ritz_vectors_on_host(state, coordinates)
            # the run is over: free the basis (a new empty tensor: a slice would keep its storage)
            state.basis = state.basis.new_empty((0, n))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            vectors = vectors.to(device)
        return vectors.div_(self.operator.space.row_norms(vectors)[:, None])  # in place


def _check_start_block(start_block: Any, n: int, block_size: int, checkpoint: Any) -> None:
    """ValueError/TypeError where a caller's start block enters, saying what shape it needs."""
    if not isinstance(start_block, Tensor) or not start_block.is_floating_point():
        raise TypeError(f"start_block must be a floating torch.Tensor, got {type(start_block)}")
    if tuple(start_block.shape) != (n, block_size):
        raise ValueError(
            f"start_block has shape {tuple(start_block.shape)}; it must be (n, block_size) = "
            f"({n}, {block_size}): one column per block vector"
        )
    if not bool(torch.isfinite(start_block).all()):
        raise ValueError("start_block contains NaN or Inf")
    if checkpoint is not None:
        raise ValueError(
            "start_block cannot be combined with checkpoint (a resumed run restarts from its "
            "file); pass one of them"
        )


def _target_order(values: np.ndarray, which: str) -> np.ndarray:
    """Indices of ascending ``values`` from most to least wanted."""
    if which == "LA":
        return np.arange(len(values))[::-1].copy()
    if which == "SA":
        return np.arange(len(values))
    if which == "LM":
        return np.argsort(-np.abs(values), kind="stable")
    high = np.arange(len(values))[::-1]
    low = np.arange(len(values))
    alternating = np.empty(2 * len(values), dtype=int)
    alternating[0::2], alternating[1::2] = high, low
    _, first = np.unique(alternating, return_index=True)
    return alternating[np.sort(first)]


def _capacity(
    n: int,
    k: int,
    block_size: int,
    max_basis: int | None,
    max_basis_bytes: int | None,
    basis_dtype: torch.dtype,
    *,
    length: int | None = None,
) -> int:
    """Basis rows to allocate; too small a basis for k pairs is an error naming the minimum.
    ``length``: entries of each basis row held here (default ``n``; fewer for sharded vectors)."""
    minimum = k + 2 * block_size
    if max_basis is None:
        max_basis = max(100, 4 * k, k + 4 * block_size)
    else:
        check_int("max_basis", max_basis, 1)
    capacity = min(n, max_basis)
    if capacity == n:
        capacity -= n % block_size  # a basis of n vectors must hold whole blocks
    if max_basis_bytes is not None:
        row_bytes = max(1, n if length is None else length) * torch.finfo(basis_dtype).bits // 8
        capacity = min(capacity, max_basis_bytes // row_bytes)
    if capacity < minimum and capacity < n:
        raise ValueError(
            f"the basis can hold {capacity} vectors (max_basis={max_basis}, "
            f"max_basis_bytes={max_basis_bytes}), but k={k} pairs with block_size={block_size} "
            f"need at least k + 2 * block_size = {minimum}; raise max_basis/max_basis_bytes or "
            "store the basis on the host (basis_device='cpu') or in a cheaper basis_dtype"
        )
    return capacity
