"""Suite ``matvec``: one curvature-vector product (Hessian, GGN, empirical Fisher) on the MLP,
the CNN and the transformer, by torch-linop, every installed library and hand-rolled autograd.

Per implementation: the relative error against ours on the same vector, the median time per
product, that time as a multiple of one gradient (forward + backward of the same loss) and the
peak memory above what was allocated before the operator was built. Operators are built outside
the timing; one warm-up product precedes the measured ones. On smoke sizes in float64 an
independent check joins each table: central differences of gradients for the Hessian and
``torch_linop.reference``'s dense matrices (first-order ``jacrev`` only) for the GGN and EF.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
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
    time_calls,
)
from benchmarks.suites._report import SuiteResult, Table, short_error

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


def _default_repeats(config: RunConfig) -> int:
    if config.repeats is not None:
        return config.repeats
    return 1 if config.smoke else (5 if config.device.type == "cuda" else 3)


def _release(device: torch.device) -> None:
    gc.collect()  # cheap after freeze_heap(); frees the graph cycles some libraries leave
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(
    build: Callable[..., Callable[[torch.Tensor], torch.Tensor]],
    build_args: tuple[Any, ...],
    vector: torch.Tensor,
    device: torch.device,
    repeats: int,
    smoke: bool,
) -> dict[str, Any]:
    """Build (untimed, but its retained memory counts), warm up, measure peak memory on one
    product, then time ``repeats`` products. Smoke runs time the single memory-probed product
    (no warm-up): they check agreement, their timings mean nothing."""
    probe = MemoryProbe(device)
    matvec = build(*build_args)
    if smoke:
        start = time.perf_counter()
        result, peak = probe.peak(lambda: matvec(vector))
        seconds = time.perf_counter() - start
        return {"result": result.detach(), "peak": peak, "seconds": seconds, "samples": [seconds]}
    matvec(vector)
    result, peak = probe.peak(lambda: matvec(vector))
    timing = time_calls(lambda: matvec(vector), device, repeats)
    return {
        "result": result.detach(),
        "peak": peak,
        "seconds": timing.median,
        "samples": timing.samples,
    }


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


def run(config: RunConfig) -> SuiteResult:
    dtype = config.dtype_or(torch.float64 if config.smoke else torch.float32)
    repeats = _default_repeats(config)
    peers = load_peers(config.peers)
    if peers[0].name != "ours" or not peers[0].available:
        raise RuntimeError("the matvec suite needs torch-linop itself as the first implementation")
    result = SuiteResult(
        "matvec",
        settings={
            "dtype": str(dtype),
            "repeats": repeats,
            "tier": config.tier,
            "seed": config.seed,
        },
    )
    skipped = [f"{peer.label}: {peer.missing}" for peer in peers if not peer.available]
    layer_norm_bug = torch_func_layer_norm_bug()
    result.settings["torch_func_layer_norm_bug"] = layer_norm_bug
    for model_name in config.models or list(DEFAULT_MODELS):
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
        table = Table(
            f"{model_name}: {problem.description}; {problem.num_params:,} parameters, "
            f"{str(dtype).replace('torch.', '')}, {config.device.type}",
            COLUMNS,
        )
        gradient = _measure(
            _gradient_builder, (problem,), vector, config.device, repeats, config.smoke
        )
        gradient_seconds = gradient["seconds"]
        table.rows.append(
            [
                "—",
                "gradient (reference)",
                None,
                1e3 * gradient_seconds,
                1.0,
                mib(gradient["peak"]),
                "",
            ]
        )
        result.records.append(
            {
                "model": model_name,
                "curvature": "gradient",
                "implementation": "gradient",
                "seconds": gradient_seconds,
                "samples": gradient["samples"],
                "peak_bytes": gradient["peak"],
                "num_params": problem.num_params,
            }
        )
        del gradient
        for curvature in CURVATURES:
            ours: torch.Tensor | None = None
            for peer, variant in _implementations(peers):
                record: dict[str, Any] = {
                    "model": model_name,
                    "curvature": curvature,
                    "implementation": _label(peer, variant),
                    "library": peer.name,
                    "version": peer.version,
                    "num_params": problem.num_params,
                }
                target = problem.with_model_copy() if peer.mutates_model else problem
                make_matvec = peer.routine("make_matvec")
                args = (target, curvature) if variant is None else (target, curvature, variant)
                note = ""
                try:
                    measured = _measure(
                        make_matvec, args, vector, config.device, repeats, config.smoke
                    )
                except Unsupported as reason:
                    record["skipped"] = str(reason)
                    table.rows.append(
                        [
                            CURVATURE_LABELS[curvature],
                            _label(peer, variant),
                            None,
                            None,
                            None,
                            None,
                            f"not offered: {reason}",
                        ]
                    )
                    result.records.append(record)
                    continue
                except Exception as error:  # a library failing on a model is a result too
                    record["error"] = short_error(error)
                    table.rows.append(
                        [
                            CURVATURE_LABELS[curvature],
                            _label(peer, variant),
                            None,
                            None,
                            None,
                            None,
                            f"failed: {short_error(error)}",
                        ]
                    )
                    result.records.append(record)
                    del target
                    _release(config.device)
                    continue
                if peer.name == "ours":
                    ours = measured["result"]
                error_vs_ours = None if ours is None else relative_error(measured["result"], ours)
                if (
                    peer.name == "curvlinops"
                    and curvature == "hessian"
                    and layer_norm_bug
                    and model_name == "gpt"
                ):
                    note = "torch.func LayerNorm bug (see notes)"
                record.update(
                    {
                        "rel_error_vs_ours": error_vs_ours,
                        "seconds": measured["seconds"],
                        "samples": measured["samples"],
                        "times_gradient": measured["seconds"] / gradient_seconds,
                        "peak_bytes": measured["peak"],
                    }
                )
                result.records.append(record)
                table.rows.append(
                    [
                        CURVATURE_LABELS[curvature],
                        _label(peer, variant),
                        error_vs_ours if peer.name != "ours" else None,
                        1e3 * measured["seconds"],
                        measured["seconds"] / gradient_seconds,
                        mib(measured["peak"]),
                        note,
                    ]
                )
                del measured, target
                _release(config.device)
            if (
                ours is not None
                and dtype == torch.float64
                and problem.num_params <= INDEPENDENT_CHECK_MAX_PARAMS
            ):
                check, how = _independent_check(problem, curvature, vector)
                error = relative_error(check, ours)
                table.rows.append(
                    [
                        CURVATURE_LABELS[curvature],
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
                        "curvature": curvature,
                        "implementation": "independent check",
                        "method": how,
                        "rel_error_vs_ours": error,
                    }
                )
        table.notes.append(
            "time: median over "
            f"{repeats} products after one warm-up; × gradient: that time over the median time "
            "of one forward + backward of the same loss; peak: "
            + (
                "torch.cuda.max_memory_allocated during one product, above the memory allocated "
                "before the operator was built"
                if config.device.type == "cuda"
                else "peak resident set size during one product, above the resident size before "
                "the operator was built"
            )
        )
        if skipped:
            table.notes.append("skipped (not importable): " + "; ".join(skipped))
        if layer_norm_bug and model_name == "gpt":
            table.notes.append(TORCH_FUNC_BUG_NOTE)
        result.tables.append(table)
        problem = None  # free the model before the next one is built
        _release(config.device)
    return result
