"""``torch-linop`` / ``python -m torch_linop``: the curvature of a model in one command.

``main()`` parses the options, builds the workload (the built-in digits MLP, ``--model
MODULE:FACTORY`` or ``--hf-config``), trains briefly if asked, computes the requested quantities,
prints a table, and writes a PNG plot (and ``--json``). Bad usage exits with code 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from torch_linop.cli.arguments import Options, parse_options
from torch_linop.cli.errors import USAGE_EXIT_CODE, UsageError
from torch_linop.cli.threads import choose_threads, describe_threads
from torch_linop.cli.workload import Workload, cast_floating, count_parameters, resolve_device

__all__ = ["main", "UsageError"]

BROKEN_PIPE_EXIT_CODE = 141  # 128 + SIGPIPE, what a shell reports for a tool cut off by a pipe


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


# Adam and the loss overflow float16's range (max 65,504) within a few steps: train in float32,
# then analyse in the requested float16.
TRAINING_DTYPES = {torch.float16: torch.float32}


def prepare(workload: Workload, dtype: torch.dtype | None, device: torch.device) -> Workload:
    """Cast and move the model (and cast list data) before training and analysis."""
    if dtype is not None:
        workload.model.to(dtype)
        if isinstance(workload.data, list):
            workload.data = [cast_floating(batch, dtype) for batch in workload.data]
    workload.model.to(device)
    return workload


def check_outputs(options: Options) -> None:
    """The plot's folder and the JSON file must be writable before any work is done."""
    from torch_linop.cli.preflight import check_writable_directory, check_writable_file

    if options.plot and any(q in options.quantities for q in ("eigs", "density", "diag")):
        check_writable_directory(options.output_dir, "--output-dir")
    if options.json_path is not None:
        check_writable_file(options.json_path, "--json")


def train_workload(workload: Workload, options: Options, dtype: torch.dtype | None) -> list[float]:
    """Brief training (in float32 when float16 was asked for, cast back afterwards); a loss that
    turns non-finite stops the run with the step, the dtype and what to change."""
    from torch_linop.cli.training import train

    steps = options.train_steps if options.train_steps is not None else workload.default_train_steps
    training_dtype = TRAINING_DTYPES.get(dtype) if steps > 0 and dtype is not None else None
    if training_dtype is not None:
        prepare(workload, training_dtype, next(workload.model.parameters()).device)
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
    bad_step = next((step for step, loss in enumerate(losses, 1) if not np.isfinite(loss)), None)
    if bad_step is not None:
        used = training_dtype or next(workload.model.parameters()).dtype
        raise UsageError(
            f"training diverged: the loss became {losses[bad_step - 1]} at Adam step {bad_step} "
            f"of {steps} in {str(used).removeprefix('torch.')}; train in a wider dtype "
            "(--dtype float32 or float64), fewer steps (--train-steps), or analyse the model as "
            "it is (--train-steps 0)"
        )
    if training_dtype is not None:
        prepare(workload, dtype, next(workload.model.parameters()).device)
    return losses


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'s' * (count != 1)}"


def run(options: Options) -> int:
    """One run; torch's thread count is restored afterwards (``main`` may run in a notebook)."""
    threads_before = torch.get_num_threads()
    try:
        return _run(options)
    finally:
        torch.set_num_threads(threads_before)


def _run(options: Options) -> int:
    from torch_linop.cli.analysis import analyse, build_operator
    from torch_linop.cli.preflight import check_top_k, selected_parameters
    from torch_linop.cli.report import analysis_to_dict, format_report, write_json

    started = time.perf_counter()
    check_outputs(options)
    device = resolve_device(options.device)
    workload, dtype = load_workload(options)
    workload = prepare(workload, dtype, device)
    threads = choose_threads(options.threads, count_parameters(workload.model), device)
    torch.set_num_threads(threads)
    num_selected = sum(selected_parameters(workload.model, options.param_filter).values())
    if "eigs" in options.quantities:
        check_top_k(options.top_k, num_selected)
    losses = train_workload(workload, options, dtype)
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
    threads_line = describe_threads(options.threads, threads, device)
    if threads_line is not None:
        header["threads"] = threads_line
    if losses:
        summary = f"{_plural(len(losses), 'Adam step')}, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if dtype in TRAINING_DTYPES:
            trained_in = str(TRAINING_DTYPES[dtype]).removeprefix("torch.")
            summary += (
                f" (trained in {trained_in}: Adam overflows {str(dtype).removeprefix('torch.')})"
            )
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
        code = run(options)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except UsageError as error:
        print(f"torch-linop: error: {error}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("torch-linop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``torch-linop | head -1``): stop quietly, as Unix tools do, and
        # point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT_CODE
