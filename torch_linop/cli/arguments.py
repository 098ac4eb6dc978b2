"""Command-line options of ``torch-linop``: parsing and validation of each value where it enters."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

CURVATURES = ("hessian", "ggn", "ef", "mc-fisher")
QUANTITIES = ("eigs", "trace", "density", "diag")
DEFAULT_QUANTITIES = ("eigs", "trace", "density")
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DESCRIPTION = """\
Curvature of a PyTorch model from the command line: the top eigenvalues (Lanczos), the trace
(Hutch++), the spectral density (stochastic Lanczos quadrature) and the diagonal of its Hessian,
GGN or Fisher. With no arguments it trains a small MLP on scikit-learn's bundled digits data (or a
synthetic regression task without scikit-learn) and analyses its Hessian; nothing is downloaded.
"""

EPILOG = """\
examples:
  torch-linop                                       the built-in job
  torch-linop --curvature ggn -k 20 --quantities eigs,density
  torch-linop --model my_project.curvature:build     build() returns (model, data[, loss])
  torch-linop --hf-config gpt2 --hf-random-init --param-filter 'transformer.h.*.attn.*'
"""


@dataclass(frozen=True)
class Options:
    """Validated options of one run."""

    model: str | None
    hf_config: str | None
    hf_random_init: bool
    curvature: str
    quantities: tuple[str, ...]
    top_k: int
    param_filter: tuple[str, ...]
    device: str
    dtype: torch.dtype | None
    seed: int
    threads: int | None
    output_dir: Path
    json_path: Path | None
    train_steps: int | None
    num_matvecs: int
    slq_runs: int
    slq_steps: int
    mc_samples: int
    cache_graph: bool
    plot: bool
    progress: bool


def _quantities(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in QUANTITIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown quantity {', '.join(unknown) or repr(text)}; choose a comma-separated "
            f"subset of {','.join(QUANTITIES)}, e.g. --quantities eigs,trace"
        )
    return tuple(dict.fromkeys(names))  # order kept, duplicates dropped


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(part.strip() for part in text.split(",") if part.strip())
    if not patterns:
        raise argparse.ArgumentTypeError(
            f"--param-filter needs glob patterns such as 'fc1.*' or 'blocks.*.attn.*', got {text!r}"
        )
    return patterns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-linop",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    what = parser.add_argument_group("what to analyse (default: the built-in job)")
    source = what.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="a callable returning (model, data) or (model, data, loss); MODULE is an importable "
        "module or a path to a .py file. Without a loss, integer targets get cross-entropy and "
        "float targets mean-squared error",
    )
    source.add_argument(
        "--hf-config",
        metavar="NAME|PATH",
        help="a HuggingFace causal LM: a built-in tiny config name (gpt2, llama) or a local "
        "directory with config.json; synthetic token data",
    )
    what.add_argument(
        "--hf-random-init",
        action="store_true",
        help="random weights from the config (required for named configs; nothing is downloaded)",
    )
    what.add_argument(
        "--curvature", choices=CURVATURES, default="hessian", help="matrix (default: hessian)"
    )
    what.add_argument(
        "--param-filter",
        type=_patterns,
        default=(),
        metavar="GLOBS",
        help="comma-separated glob patterns of parameter names, e.g. '0.*' or 'transformer.h.*.attn.*'",
    )

    compute = parser.add_argument_group("what to compute")
    compute.add_argument(
        "--quantities",
        type=_quantities,
        default=DEFAULT_QUANTITIES,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(QUANTITIES)} (default: {','.join(DEFAULT_QUANTITIES)})",
    )
    compute.add_argument(
        "-k",
        dest="top_k",
        type=_positive_int,
        default=10,
        metavar="K",
        help="top eigenvalues: the K largest in magnitude, as lanczos(which='LM'); for the PSD "
        "GGN and Fishers the K largest (default: 10). K >= the number of selected parameters "
        "computes all of them densely (up to 1,024 parameters)",
    )
    compute.add_argument(
        "--num-matvecs",
        metavar="N",
        type=_positive_int,
        default=99,
        help="products spent on the trace and on the diagonal estimate each (default: 99)",
    )
    compute.add_argument(
        "--slq-runs",
        metavar="N",
        type=_positive_int,
        default=8,
        help="SLQ probe vectors (default: 8)",
    )
    compute.add_argument(
        "--slq-steps",
        metavar="N",
        type=_positive_int,
        default=64,
        help="Lanczos steps per SLQ run (default: 64)",
    )
    compute.add_argument(
        "--mc-samples",
        metavar="N",
        type=_positive_int,
        default=1,
        help="sampled targets per input for --curvature mc-fisher (default: 1)",
    )
    compute.add_argument(
        "--cache-graph",
        action="store_true",
        help="keep each batch's graph between products (faster products; memory grows with "
        "the number of batches)",
    )
    compute.add_argument(
        "--train-steps",
        metavar="N",
        type=_non_negative_int,
        default=None,
        help="optimizer steps before the analysis (default: 200 for the built-in digits job, 300 for the synthetic one, 0 otherwise)",
    )

    run = parser.add_argument_group("how to run")
    run.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    run.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="cast the model and its floating data (default: float64 for the built-in job, "
        "float32 for --hf-config, the model's own dtype for --model)",
    )
    run.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed for everything random (default: 0)"
    )
    run.add_argument(
        "--threads",
        metavar="N",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: 1 for models under 1M parameters, whose small "
        "products run fastest on one thread, else torch's choice)",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        default=Path("torch-linop-output"),
        help="where the plot goes (default: ./torch-linop-output)",
    )
    run.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write every number to this JSON file",
    )
    run.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse ``argv``; argparse exits with code 2 on unknown options or malformed values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hf_random_init and args.hf_config is None:
        parser.error("--hf-random-init only applies to --hf-config NAME|PATH")
    return Options(
        model=args.model,
        hf_config=args.hf_config,
        hf_random_init=args.hf_random_init,
        curvature=args.curvature,
        quantities=args.quantities,
        top_k=args.top_k,
        param_filter=args.param_filter,
        device=args.device,
        dtype=None if args.dtype is None else DTYPES[args.dtype],
        seed=args.seed,
        threads=args.threads,
        output_dir=args.output_dir,
        json_path=args.json_path,
        train_steps=args.train_steps,
        num_matvecs=args.num_matvecs,
        slq_runs=args.slq_runs,
        slq_steps=args.slq_steps,
        mc_samples=args.mc_samples,
        cache_graph=args.cache_graph,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )
