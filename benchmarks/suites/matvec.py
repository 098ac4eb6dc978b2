"""Suite ``matvec``: one curvature-vector product (Hessian, GGN, empirical Fisher) on the MLP,
the CNN and the transformer, by torch-linop, every installed library and hand-rolled autograd.

Per implementation: the relative error against ours (our default operator; our Hessian with
kept gradient graphs, ``cache_graph=True``, is a row of its own) on the same vector, the median
time per product, that time as a multiple of one gradient (forward + backward of the same loss)
and the peak memory above what was allocated before the operator was built. Phase 1 takes each
implementation alone (build, warm-up, one product under the memory probe); phase 2 times all
of them, and the gradient, in round-robin rounds, so load changes on a shared machine hit every
implementation alike. Operators are built outside the timing. On smoke sizes in float64 an
independent check joins each table: central differences of gradients for the Hessian and
``torch_linop.reference``'s dense matrices (first-order ``jacrev`` only) for the GGN and EF.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.models import Problem, make_problem
from benchmarks.peers import (
    CURVATURE_LABELS,
    CURVATURES,
    Peer,
    Unsupported,
    flat,
    load_peers,
    split,
)
from benchmarks.suites import RunConfig
from benchmarks.suites._checks import TORCH_FUNC_BUG_NOTE, torch_func_layer_norm_bug
from benchmarks.suites._measure import (
    MemoryProbe,
    freeze_heap,
    mib,
    relative_error,
    synchronize,
)
from benchmarks.suites._report import SuiteResult, Table, progress, short_error

DEFAULT_MODELS = ("mlp", "cnn", "gpt")
COLUMNS = [
    "curvature",
    "implementation",
    "rel. error vs ours",
    "ms / product",
    "× gradient",
    "peak MiB",
    "note",
]
INDEPENDENT_CHECK_MAX_PARAMS = 5000
TIME_BUDGET_SECONDS = {"cpu": 30.0, "cuda": 30.0}  # per model, for the timed rounds


@dataclass
class Entry:
    """One implementation of one product on one model, and what was measured of it."""

    curvature: str
    label: str
    build: Callable[..., Callable[[torch.Tensor], torch.Tensor]]
    build_args: tuple[Any, ...]
    peer: Peer | None = None  # None: the gradient
    copies_model: bool = False
    result: torch.Tensor | None = None  # kept for ours only (the others are compared at once)
    measured: bool = False
    peak: int | None = None
    first_seconds: float | None = None
    samples: list[float] = field(default_factory=list)
    error_vs_ours: float | None = None
    skipped: str | None = None
    error: str | None = None

    def make(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Build the product (on a fresh model copy for libraries that modify the model)."""
        args = self.build_args
        if self.copies_model:
            args = (args[0].with_model_copy(), *args[1:])
        return self.build(*args)


def _release(device: torch.device) -> None:
    gc.collect()  # cheap after freeze_heap(); frees the graph cycles some libraries leave
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _probe(entry: Entry, vector: torch.Tensor, device: torch.device, smoke: bool) -> None:
    """Phase 1, one implementation alone: build (untimed, but memory it keeps counts), warm up
    (not in smoke runs), then one product under the memory probe; keeps its result."""
    probe = MemoryProbe(device)
    try:
        matvec = entry.make()
        if not smoke:
            matvec(vector)
        start = time.perf_counter()
        result, entry.peak = probe.peak(lambda: matvec(vector))
        entry.first_seconds = time.perf_counter() - start
        entry.result = result.detach()
        entry.measured = True
    except Unsupported as reason:
        entry.skipped = str(reason)
    except Exception as error:  # a library failing on a model is a result too
        entry.error = short_error(error)


def _time_round_robin(
    entries: list[Entry], vector: torch.Tensor, device: torch.device, repeats: int | None
) -> tuple[int, str]:
    """Phase 2: all implementations built side by side, one warm-up round, then rounds in which
    each is timed once, so load changes on a shared machine hit all of them alike. Without
    ``repeats``, as many rounds (3 to 25) as fit the time budget. If they do not fit in memory
    side by side, each is timed alone instead (the returned text says which)."""
    if repeats is None:
        round_seconds = sum(entry.first_seconds or 0.0 for entry in entries)
        budget = TIME_BUDGET_SECONDS[device.type]
        repeats = int(min(25, max(3, budget // max(round_seconds, 1e-9))))
    try:
        _rounds(entries, vector, device, repeats)
        return (
            repeats,
            "round-robin rounds (each implementation timed once per round, after a warm-up round)",
        )
    except torch.OutOfMemoryError:
        _release(device)
    for entry in entries:
        entry.samples.clear()
        try:
            _rounds([entry], vector, device, repeats)
        except Exception as error:
            entry.error = f"timing failed: {short_error(error)}"
        _release(device)
    return (
        repeats,
        "products per implementation, timed alone (side by side they did not fit in memory), after a warm-up product",
    )


def _rounds(entries: list[Entry], vector: torch.Tensor, device: torch.device, repeats: int) -> None:
    """Build ``entries`` side by side, warm each up once, then time each once per round."""
    built = [(entry, entry.make()) for entry in entries]
    for _, matvec in built:
        matvec(vector)
    for _ in range(repeats):
        for entry, matvec in built:
            synchronize(device)
            start = time.perf_counter()
            matvec(vector)
            synchronize(device)
            entry.samples.append(time.perf_counter() - start)


def _gradient_builder(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    def gradient(_vector: torch.Tensor) -> torch.Tensor:
        return flat(torch.autograd.grad(problem.loss(), problem.params))

    return gradient


def _independent_check(
    problem: Problem, curvature: str, vector: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """A product by a route that shares no code with any implementation under test."""
    from torch_linop import supervised_loss
    from torch_linop.reference import dense_empirical_fisher, dense_ggn

    if curvature == "hessian":
        params = problem.params
        step = 1e-4 / float(vector.norm())

        def gradient_at(shift: float) -> torch.Tensor:
            saved = [param.detach().clone() for param in params]
            with torch.no_grad():
                for param, piece in zip(params, split(vector, params)):
                    param.add_(piece, alpha=shift)
            try:
                return flat(torch.autograd.grad(problem.loss(), params))
            finally:
                with torch.no_grad():
                    for param, original in zip(params, saved):
                        param.copy_(original)

        product = (gradient_at(step) - gradient_at(-step)) / (2 * step)
        return product, "central differences of gradients (float64)"
    dense = {"ggn": dense_ggn, "ef": dense_empirical_fisher}[curvature]
    matrix = dense(problem.model, problem.batches, supervised_loss(problem.criterion))
    return matrix @ vector, "dense matrix, torch_linop.reference (first-order jacrev)"


def _implementations(peers: list[Peer]) -> list[tuple[Peer, str | None]]:
    pairs: list[tuple[Peer, str | None]] = []
    for peer in peers:
        if not peer.available:
            continue
        variants = getattr(peer.module, "VARIANTS", None) or (None,)
        pairs.extend((peer, variant) for variant in variants)
    return pairs


def _label(peer: Peer, variant: str | None) -> str:
    return peer.label if variant is None else f"{peer.label} ({variant})"


def _entries(problem: Problem, peers: list[Peer]) -> list[Entry]:
    entries = [Entry("gradient", "gradient (reference)", _gradient_builder, (problem,))]
    for curvature in CURVATURES:
        for peer, variant in _implementations(peers):
            args = (problem, curvature) if variant is None else (problem, curvature, variant)
            entries.append(
                Entry(
                    curvature,
                    _label(peer, variant),
                    peer.routine("make_matvec"),
                    args,
                    peer=peer,
                    copies_model=peer.mutates_model,
                )
            )
    return entries


def run(config: RunConfig) -> SuiteResult:
    dtype = config.dtype_or(torch.float64 if config.smoke else torch.float32)
    peers = load_peers(config.peers)
    if peers[0].name != "ours" or not peers[0].available:
        raise RuntimeError("the matvec suite needs torch-linop itself as the first implementation")
    result = SuiteResult(
        "matvec", settings={"dtype": str(dtype), "tier": config.tier, "seed": config.seed}
    )
    layer_norm_bug = torch_func_layer_norm_bug()
    result.settings["torch_func_layer_norm_bug"] = layer_norm_bug
    for model_name in config.models or list(DEFAULT_MODELS):
        _run_model(config, model_name, dtype, peers, layer_norm_bug, result)
        _release(config.device)
    return result


def _run_model(
    config: RunConfig,
    model_name: str,
    dtype: torch.dtype,
    peers: list[Peer],
    layer_norm_bug: bool,
    result: SuiteResult,
) -> None:
    """Both phases on one model; appends its table and records to ``result``."""
    problem = make_problem(
        model_name,
        config.tier,
        device=config.device,
        dtype=dtype,
        seed=config.seed,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    vector = torch.randn(problem.num_params, generator=generator, dtype=torch.float64)
    vector = vector.to(device=config.device, dtype=dtype)
    freeze_heap()
    entries = _entries(problem, peers)
    ours: dict[str, torch.Tensor] = {}
    for entry in entries:
        _probe(entry, vector, config.device, config.smoke)
        if entry.result is not None and entry.peer is not None:
            if entry.peer.name == "ours" and entry.curvature not in ours:
                ours[entry.curvature] = entry.result  # the default operator: the reference
            else:  # every other implementation, our variants included, is compared with it
                if entry.curvature in ours:
                    entry.error_vs_ours = relative_error(entry.result, ours[entry.curvature])
                entry.result = None
        outcome = entry.skipped or entry.error or f"{entry.first_seconds:.3g} s"
        progress("matvec", f"{model_name} {entry.curvature} {entry.label}: {outcome}")
        _release(config.device)
    measured = [entry for entry in entries if entry.measured]
    if config.smoke:
        for entry in measured:
            entry.samples = [entry.first_seconds or 0.0]
        timing = (1, "product (smoke run: one product, no warm-up; timings mean nothing)")
    else:
        timing = _time_round_robin(measured, vector, config.device, config.repeats)
        _release(config.device)
    table = _model_table(model_name, problem, dtype, config, entries, timing, layer_norm_bug)
    if dtype == torch.float64 and problem.num_params <= INDEPENDENT_CHECK_MAX_PARAMS:
        _add_independent_checks(table, result, model_name, problem, entries, vector)
    skipped = [f"{peer.label}: {peer.missing}" for peer in peers if not peer.available]
    if skipped:
        table.notes.append("skipped (not importable): " + "; ".join(skipped))
    result.tables.append(table)
    result.records.extend(_records(model_name, problem, entries))


def _model_table(
    model_name: str,
    problem: Problem,
    dtype: torch.dtype,
    config: RunConfig,
    entries: list[Entry],
    timing: tuple[int, str],
    layer_norm_bug: bool,
) -> Table:
    table = Table(
        f"{model_name}: {problem.description}; {problem.num_params:,} parameters, "
        f"{str(dtype).replace('torch.', '')}, {config.device.type}",
        COLUMNS,
    )
    gradient_seconds = statistics.median(entries[0].samples) if entries[0].samples else None
    for entry in entries:
        curvature = CURVATURE_LABELS.get(entry.curvature, "—")
        if entry.skipped or entry.error:
            why = f"not offered: {entry.skipped}" if entry.skipped else f"failed: {entry.error}"
            table.rows.append([curvature, entry.label, None, None, None, None, why])
            continue
        error = entry.error_vs_ours
        seconds = statistics.median(entry.samples)
        note = ""
        if (
            layer_norm_bug
            and entry.peer is not None
            and entry.peer.name == "curvlinops"
            and entry.curvature == "hessian"
            and model_name == "gpt"
        ):
            note = "torch.func LayerNorm bug (see notes)"
        table.rows.append(
            [
                curvature,
                entry.label,
                error,
                1e3 * seconds,
                seconds / gradient_seconds if gradient_seconds else None,
                mib(entry.peak),
                note,
            ]
        )
    table.notes.append(
        f"time: median of {timing[0]} {timing[1]}; × gradient: that over the median time of one "
        "forward + backward of the same loss, timed alongside; peak: "
        + (
            "torch.cuda.max_memory_allocated during one product, above the memory allocated "
            "before the operator was built"
            if config.device.type == "cuda"
            else "peak resident set size during one product, above the resident size before "
            "the operator was built"
        )
    )
    if layer_norm_bug and model_name == "gpt":
        table.notes.append(TORCH_FUNC_BUG_NOTE)
    return table


def _add_independent_checks(
    table: Table,
    result: SuiteResult,
    model_name: str,
    problem: Problem,
    entries: list[Entry],
    vector: torch.Tensor,
) -> None:
    for entry in entries:
        if entry.peer is None or entry.peer.name != "ours" or entry.result is None:
            continue
        check, how = _independent_check(problem, entry.curvature, vector)
        error = relative_error(check, entry.result)
        table.rows.append(
            [
                CURVATURE_LABELS[entry.curvature],
                f"independent check: {how}",
                error,
                None,
                None,
                None,
                "error of ours against it",
            ]
        )
        result.records.append(
            {
                "model": model_name,
                "curvature": entry.curvature,
                "implementation": "independent check",
                "method": how,
                "rel_error_vs_ours": error,
            }
        )


def _records(model_name: str, problem: Problem, entries: list[Entry]) -> list[dict[str, Any]]:
    gradient_seconds = statistics.median(entries[0].samples) if entries[0].samples else None
    records = []
    for entry in entries:
        record: dict[str, Any] = {
            "model": model_name,
            "curvature": entry.curvature,
            "implementation": entry.label,
            "library": None if entry.peer is None else entry.peer.name,
            "version": None if entry.peer is None else entry.peer.version,
            "num_params": problem.num_params,
        }
        if entry.skipped:
            record["skipped"] = entry.skipped
        elif entry.error:
            record["error"] = entry.error
        else:
            seconds = statistics.median(entry.samples)
            record.update(
                {
                    "rel_error_vs_ours": entry.error_vs_ours,
                    "seconds": seconds,
                    "samples": entry.samples,
                    "times_gradient": seconds / gradient_seconds if gradient_seconds else None,
                    "peak_bytes": entry.peak,
                }
            )
        records.append(record)
    return records
