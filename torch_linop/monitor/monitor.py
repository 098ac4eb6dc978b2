"""``CurvatureMonitor``: sharpness, preconditioned sharpness and trace, checked every few
training steps at a bounded cost, with Lanczos warm-started from the previous check.

A check reads the current parameters (and, for the preconditioned sharpness, Adam's second
moments) and writes nothing: the model's parameters, modules' train/eval modes, buffers and
gradients, the optimiser's state and the global RNG states are the same after a check as before,
even when the check raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_linop.algebra import DiagonalOperator
from torch_linop.empirical_fisher import EmpiricalFisherOperator
from torch_linop.ggn import GGNOperator
from torch_linop.hessian import HessianOperator
from torch_linop.mc_fisher import MCFisherOperator
from torch_linop.monitor.preconditioner import (
    adam_inverse_sqrt_preconditioner,
    adam_threshold,
    check_adam_like,
    gradient_descent_threshold,
    learning_rate_and_beta1,
)
from torch_linop.monitor.records import CheckRecord, load_history, save_history
from torch_linop.options import ProductOptions
from torch_linop.params import ParamFilter
from torch_linop.solvers import lanczos, trace
from torch_linop.solvers.eigenpairs import default_tol

CURVATURES: dict[str, type] = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "ef": EmpiricalFisherOperator,
    "mc-fisher": MCFisherOperator,
}
QUANTITIES = ("top_eigenvalue", "preconditioned_top_eigenvalue", "trace")
DEFAULT_MAX_SHARE = 0.05
_clock = time.perf_counter  # wall clock of the cadence and the records (a test replaces it)
DEFAULT_MAX_MATVECS = 400
DEFAULT_TOL = (
    1e-4  # ||H v - lambda v|| <= tol ||H||: eigenvalue error <= tol ||H||, typically far less
)
DEFAULT_FRESH_WEIGHT = 1e-2


class CurvatureMonitor:
    """Tracks curvature quantities of ``model`` on ``data`` during training.

    Call :meth:`step` after each ``optimizer.step()``; when a check is due it runs one and
    appends a :class:`~torch_linop.monitor.records.CheckRecord` to :attr:`history` (and returns
    it). Quantities: ``"top_eigenvalue"`` (the ``k`` largest eigenvalues of the curvature, by
    Lanczos until ``||H v - lambda v|| <= tol ||H||``, default ``tol=1e-4`` (coarser in bf16/fp16,
    as the solver's default for the dtype): the eigenvalue error is at most that and, being
    quadratic in the residual, typically far less),
    ``"preconditioned_top_eigenvalue"`` (the same for ``P^-1/2 H P^-1/2``
    with Adam's ``P = sqrt(v / (1 - beta2^t)) + eps`` read from ``optimizer``; also switched on by
    ``preconditioned=True``) and ``"trace"`` (Hutch++ with ``trace_matvecs`` products and a
    standard error). Each record carries ``2/lr`` and, for Adam, ``(2 + 2 beta1)/((1 - beta1) lr)``.

    Warm start: after the first check each Lanczos run starts from the previous check's Ritz
    vectors plus ``fresh_weight`` times fresh random unit directions, and checks convergence
    after every (block) step, so it stops at the first step that meets ``tol``: ``k`` products
    per step, one or two steps while the parameters move little.
    A warm start finds the eigenpairs that continue the previous ones: an eigenvalue that
    overtakes them between two checks is found by the next cold check, every ``cold_every``-th
    (default 10; None: only the first). ``warm_start=False`` starts every check cold.
    Cost control: ``every="auto"`` (default) spaces the checks so that they take at most
    ``max_share`` (5%) of the wall time since the first step (an int checks every ``every`` steps);
    each eigen-quantity gets ``max_matvecs`` Krylov products per check (plus ``k`` residual
    products per Lanczos run); a check that
    runs out first is recorded with ``converged=False`` and warns (its value is rough). The
    curvature is taken over ``num_batches`` batches of ``data`` (all by default) with
    ``cache_graph`` products where the curvature offers them (the kept graphs are dropped after
    each check, so training never carries them). ``eval_mode=True`` (default) runs the checks
    with every module in eval mode (dropout off: products must be deterministic) and restores
    each module's own mode after. ``operator_kwargs`` go to the curvature operator (e.g.
    ``options=ProductOptions(...)``; ``num_batches`` is set in those options).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss: Any,
        *,
        every: int | str = "auto",
        max_share: float = DEFAULT_MAX_SHARE,
        curvature: str = "hessian",
        quantities: Sequence[str] = ("top_eigenvalue",),
        k: int = 1,
        optimizer: Any = None,
        preconditioned: bool = False,
        num_batches: int | None = None,
        param_filter: ParamFilter | None = None,
        cache_graph: bool = False,
        tol: float | None = None,
        max_matvecs: int = DEFAULT_MAX_MATVECS,
        trace_matvecs: int = 30,
        warm_start: bool = True,
        cold_every: int | None = 10,
        fresh_weight: float = DEFAULT_FRESH_WEIGHT,
        seed: int = 0,
        eval_mode: bool = True,
        operator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}")
        if isinstance(quantities, str):
            quantities = (quantities,)
        unknown = [name for name in quantities if name not in QUANTITIES]
        if unknown:
            raise ValueError(f"unknown quantities {unknown}; choose from {QUANTITIES}")
        chosen = [name for name in QUANTITIES if name in quantities]
        if preconditioned and "preconditioned_top_eigenvalue" not in chosen:
            chosen.insert(1 if "top_eigenvalue" in chosen else 0, "preconditioned_top_eigenvalue")
        if not chosen:
            raise ValueError(f"quantities is empty; choose from {QUANTITIES}")
        if "preconditioned_top_eigenvalue" in chosen:
            if optimizer is None:
                raise ValueError(
                    "the preconditioned sharpness reads Adam's state: pass optimizer=your "
                    "Adam/AdamW optimiser"
                )
            check_adam_like(optimizer)
        if every != "auto":
            _check_int("every", every, 1)
        if not (isinstance(max_share, (int, float)) and 0 < max_share <= 1):
            raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
        for name, value, minimum in (
            ("k", k, 1),
            ("max_matvecs", max_matvecs, k),
            ("trace_matvecs", trace_matvecs, 3),
        ):
            _check_int(name, value, minimum)
        if cold_every is not None and (
            not isinstance(cold_every, int) or isinstance(cold_every, bool) or cold_every < 1
        ):
            raise ValueError(f"cold_every must be an int >= 1 or None, got {cold_every!r}")
        if not (isinstance(fresh_weight, (int, float)) and fresh_weight >= 0):
            raise ValueError(f"fresh_weight must be a number >= 0, got {fresh_weight!r}")
        self.model, self.data, self.loss = model, data, loss
        self.every, self.curvature, self.quantities = every, curvature, tuple(chosen)
        self.max_share = float(max_share)
        self._first_step_time: float | None = None
        self.monitor_seconds = 0.0  # wall time spent in checks
        self._last_check_seconds = 0.0
        self.k, self.optimizer, self.tol = k, optimizer, tol
        self.max_matvecs, self.trace_matvecs = max_matvecs, trace_matvecs
        self.warm_start, self.fresh_weight = warm_start, float(fresh_weight)
        self.cold_every = cold_every
        self.seed, self.eval_mode = seed, eval_mode
        kwargs = dict(operator_kwargs or {})
        kwargs.setdefault("param_filter", param_filter)
        if num_batches is not None:
            options = kwargs.get("options") or ProductOptions()
            kwargs["options"] = dataclasses.replace(options, num_batches=num_batches)
        if cache_graph:
            if curvature == "mc-fisher":
                raise ValueError("cache_graph=True is not offered by the MC Fisher here")
            kwargs["cache_graph"] = True
        self._operator_kwargs = kwargs
        self._operator: Any = None
        self._ritz_vectors: dict[str, Tensor] = {}  # (n, k) per eigen-quantity, for warm starts
        self.history: list[CheckRecord] = []
        self._calls = 0

    # ----------------------------------------------------------------- public
    @property
    def operator(self) -> Any:
        """The curvature operator, built at the first check (it reads the live parameters)."""
        if self._operator is None:
            self._operator = CURVATURES[self.curvature](
                self.model, self.data, self.loss, **self._operator_kwargs
            )
        return self._operator

    def step(self, step: int | None = None) -> CheckRecord | None:
        """Run a check if one is due at ``step`` (default: the number of calls so far, from 1);
        returns the new record or None. Due: every ``every``-th step, or with ``every="auto"``
        at the first call and then whenever the time in checks, plus what the last check took,
        is at most ``max_share`` of the wall time since the first call: after the first check
        (whose cost a long enough run amortises) checks stay within that share of training."""
        self._calls += 1
        step = self._calls if step is None else int(step)
        now = _clock()
        if self._first_step_time is None:
            self._first_step_time = now
        if self.every == "auto":
            elapsed = now - self._first_step_time
            # the next check is predicted to cost what the last one did
            expected = self.monitor_seconds + self._last_check_seconds
            if self.history and expected > self.max_share * elapsed:
                return None
        elif step % int(self.every) != 0:
            return None
        return self.check(step)

    @property
    def share(self) -> float:
        """Time in checks over the wall time since the first :meth:`step` call (NaN before)."""
        if self._first_step_time is None:
            return float("nan")
        elapsed = _clock() - self._first_step_time
        return self.monitor_seconds / elapsed if elapsed > 0 else float("nan")

    def check(self, step: int) -> CheckRecord:
        """Compute every quantity now, append the record to :attr:`history` and return it."""
        record = CheckRecord(step=int(step))
        started = _clock()
        with self._untouched():
            operator = self.operator
            try:
                for name in self.quantities:
                    if name == "trace":
                        self._trace(record, operator)
                    elif name == "top_eigenvalue":
                        self._top_eigenvalues(record, name, operator)
                    else:
                        diagonal = adam_inverse_sqrt_preconditioner(
                            self.optimizer, operator.params, operator.torch_dtype
                        )
                        scaling = DiagonalOperator(diagonal)
                        self._top_eigenvalues(record, name, scaling @ operator @ scaling)
                        del scaling, diagonal
            finally:
                if hasattr(operator, "clear_cache"):
                    operator.clear_cache()  # kept graphs must not outlive the check
        self._add_thresholds(record)
        self.history.append(record)
        self._last_check_seconds = _clock() - started
        self.monitor_seconds += self._last_check_seconds
        unconverged = [name for name, ok in record.converged.items() if not ok]
        if unconverged:
            warnings.warn(
                f"CurvatureMonitor step {record.step}: {', '.join(unconverged)} did not converge "
                f"within max_matvecs={self.max_matvecs} products; recorded with converged=False "
                "(a rough value). Raise max_matvecs or loosen tol",
                RuntimeWarning,
                stacklevel=2,
            )
        return record

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`history` as JSON (:func:`~torch_linop.monitor.records.load_history`
        reads it back)."""
        save_history(self.history, path)

    def load(self, path: str | os.PathLike[str]) -> list[CheckRecord]:
        """Replace :attr:`history` with the records saved at ``path`` (e.g. to resume a run;
        the next check starts cold) and return them."""
        self.history = load_history(path)
        self._ritz_vectors.clear()
        return self.history

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """The trajectories with their threshold lines as a matplotlib Figure (saved to ``path``
        if given); see :func:`~torch_linop.monitor.plot.plot_history`."""
        from torch_linop.monitor.plot import plot_history

        return plot_history(self.history, path)

    # ----------------------------------------------------------------- quantities
    def _top_eigenvalues(self, record: CheckRecord, name: str, operator: Any) -> None:
        """Lanczos to ``tol`` for the top ``k``; warm: from the previous Ritz vectors (plus
        fresh directions), checking convergence after every block step (no products: the
        residuals come from the Lanczos relation), so a check stops at the first step that
        meets ``tol``, often the first or second while the parameters move little."""
        previous = self._ritz_vectors.get(name)
        number = len(self.history)
        warm = previous is not None and self.warm_start
        warm = warm and not (self.cold_every and number % self.cold_every == 0)
        started = _clock()
        if warm:
            assert previous is not None
            fresh = self._fresh_directions(record.step, name, previous)
            start = previous + self.fresh_weight * fresh
            result = self._lanczos(
                operator, record.step, name, start, self.max_matvecs, check_every=1
            )
        else:  # what a user runs: lanczos with its default (adaptive) check schedule
            result = self._lanczos(operator, record.step, name, None, self.max_matvecs)
        spent = result.num_matvecs
        seconds = _clock() - started
        vectors = result.eigenvectors
        if vectors is not None:
            self._ritz_vectors[name] = torch.as_tensor(vectors).detach().T.contiguous()
        record.values[name] = [float(value) for value in result.eigenvalues]
        record.residuals[name] = [float(value) for value in result.residuals]
        record.num_matvecs[name] = int(spent)
        record.seconds[name] = seconds
        record.converged[name] = bool(result.converged.all())
        record.warm_started[name] = warm

    def _lanczos(
        self,
        operator: Any,
        step: int,
        name: str,
        start_block: Tensor | None,
        budget: int,
        check_every: int | None = None,
    ) -> Any:
        with warnings.catch_warnings():
            # an unconverged run is reported once, by check(), with the step and the fix
            warnings.filterwarnings("ignore", message="lanczos: ", category=RuntimeWarning)
            return lanczos(
                operator,
                self.k,
                which="LA",
                tol=self._tolerance(operator),
                max_matvecs=budget,
                block_size=self.k,
                seed=self._seed(step, name),
                start_block=start_block,
                progress=False,
                check_every=check_every,
            )

    def _tolerance(self, operator: Any) -> float:
        """``tol``, or by default 1e-4 (or the solver's default for the dtype, if coarser)."""
        if self.tol is not None:
            return self.tol
        return max(DEFAULT_TOL, default_tol(torch.finfo(operator.torch_dtype).eps))

    def _trace(self, record: CheckRecord, operator: Any) -> None:
        started = _clock()
        result = trace(
            operator,
            num_matvecs=self.trace_matvecs,
            seed=self._seed(record.step, "trace"),
            progress=False,
        )
        record.values["trace"] = [float(result.estimate)]
        record.stderr["trace"] = float(result.stderr)
        record.num_matvecs["trace"] = int(result.num_matvecs)
        record.seconds["trace"] = _clock() - started
        record.converged["trace"] = True  # a fixed-budget estimate: its error bar is the stderr
        record.warm_started["trace"] = False

    def _fresh_directions(self, step: int, name: str, like: Tensor) -> Tensor:
        """Unit random columns shaped like ``like``, from an explicit generator (the global RNG
        is never drawn from)."""
        generator = torch.Generator().manual_seed(self._seed(step, name) + 1)
        fresh = torch.randn(like.shape, generator=generator, dtype=torch.float64)
        fresh /= torch.linalg.vector_norm(fresh, dim=0, keepdim=True)
        return fresh.to(device=like.device, dtype=like.dtype)

    def _seed(self, step: int, name: str) -> int:
        return (self.seed * 1_000_003 + step * 7 + QUANTITIES.index(name)) % (2**31)

    def _add_thresholds(self, record: CheckRecord) -> None:
        if self.optimizer is None:
            return
        lr, beta1 = learning_rate_and_beta1(self.optimizer, self.operator.params)
        if lr > 0:
            record.thresholds["2/lr"] = gradient_descent_threshold(lr)
            if beta1 == beta1:  # not NaN: an Adam-type optimiser
                record.thresholds["adam"] = adam_threshold(lr, beta1)

    # ----------------------------------------------------------------- invariants
    @contextlib.contextmanager
    def _untouched(self) -> Iterator[None]:
        """Run a check in eval mode (if asked) with the global RNG states saved; restore both."""
        modes = [(module, module.training) for module in self.model.modules()]
        devices = _cuda_devices(self.model)
        with torch.random.fork_rng(devices=devices):
            try:
                if self.eval_mode:
                    self.model.eval()
                yield
            finally:
                for module, training in modes:
                    module.training = training


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
