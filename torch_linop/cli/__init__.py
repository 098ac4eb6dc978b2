"""``torch-linop`` / ``python -m torch_linop``: the curvature of a model in one command.

``main()`` parses the options, builds the workload (the built-in digits MLP, ``--model
MODULE:FACTORY`` or ``--hf-config``), trains briefly if asked, computes the requested quantities,
prints a table, and writes a PNG plot (and ``--json``). Bad usage exits with code 2.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Sequence

import torch

from torch_linop.cli.arguments import Options, parse_options
from torch_linop.cli.errors import USAGE_EXIT_CODE, UsageError
from torch_linop.cli.workload import Workload, cast_floating, count_parameters, resolve_device

__all__ = ["main", "UsageError"]


def load_workload(options: Options) -> tuple[Workload, torch.dtype | None]:
    """The workload named by the options and the dtype to cast it to (None: keep)."""
    if options.model is not None:
        from torch_linop.cli.user_model import user_workload

        return user_workload(options.model), options.dtype
    if options.hf_config is not None:
        from torch_linop.cli.hf import hf_workload

        dtype = options.dtype or torch.float32
        return hf_workload(options.hf_config, options.hf_random_init, options.seed), dtype
    from torch_linop.cli.builtin import builtin_workload

    dtype = options.dtype or torch.float64
    return builtin_workload(options.seed, dtype), dtype


def prepare(workload: Workload, dtype: torch.dtype | None, device: torch.device) -> Workload:
    """Cast and move the model (and cast list data) before training and analysis."""
    if dtype is not None:
        workload.model.to(dtype)
        if isinstance(workload.data, list):
            workload.data = [cast_floating(batch, dtype) for batch in workload.data]
    workload.model.to(device)
    return workload


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'s' * (count != 1)}"


def run(options: Options) -> int:
    from torch_linop.cli.analysis import analyse, build_operator
    from torch_linop.cli.report import analysis_to_dict, format_report, write_json
    from torch_linop.cli.training import train

    started = time.perf_counter()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    workload, dtype = load_workload(options)
    workload = prepare(workload, dtype, device)
    steps = options.train_steps if options.train_steps is not None else workload.default_train_steps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        losses = train(
            workload.model,
            workload.data,
            workload.loss,
            steps=steps,
            learning_rate=workload.learning_rate,
            progress=options.progress,
        )
    operator = build_operator(workload, options)
    analysis = analyse(operator, options)

    total = count_parameters(workload.model)
    selected = analysis.num_parameters
    scope = "all" if selected == total else f"{selected:,} of {total:,} selected by --param-filter"
    header = {
        "model": workload.model_name,
        "parameters": f"{selected:,} ({scope}), {operator.torch_dtype} on {operator.device}",
        "data": f"{workload.data_name}; {analysis.num_data:,} {workload.sample_name}",
    }
    if losses:
        summary = f"{_plural(len(losses), 'Adam step')}, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if workload.evaluate is not None:
            summary += f"; {workload.evaluate()}"
        header["training"] = summary
    elif workload.evaluate is not None:
        header["model state"] = workload.evaluate()

    print(format_report(analysis, header))
    print()
    if options.plot and any(q in options.quantities for q in ("eigs", "density", "diag")):
        if importlib.util.find_spec("matplotlib") is None:
            print('Plot  skipped: matplotlib is not installed (pip install "torch-linop[plot]")')
        else:
            from torch_linop.cli.plot import plot_analysis

            path = options.output_dir / f"{options.curvature}_spectrum.png"
            written = plot_analysis(analysis, workload.model_name, path, workload.sample_name)
            if written is not None:
                print(f"Plot  {written}")
    if options.json_path is not None:
        meta = {"seed": options.seed, "quantities": list(options.quantities)}
        written_json = write_json(analysis_to_dict(analysis, header, meta), options.json_path)
        print(f"JSON  {written_json}")
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in analysis.seconds.items())
    print(f"Time  {time.perf_counter() - started:.1f} s ({timings})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torch-linop`` console script; returns the exit code."""
    options = parse_options(argv)  # argparse exits with code 2 itself on bad options
    try:
        return run(options)
    except UsageError as error:
        print(f"torch-linop: error: {error}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("torch-linop: interrupted", file=sys.stderr)
        return 130
