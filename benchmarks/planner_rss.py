"""The planner's predicted peak against the measured peak RSS of the same product on CPU.

Each measurement runs in a fresh subprocess (float32, one thread, glibc's mmap threshold fixed
at 64 KiB so that freed tensors go back to the system and RSS follows the live bytes): it warms
the code paths up on a toy model, hands freed heap back (``malloc_trim``), reads the resident
set, builds the model, its data and a vector, runs one ``op @ v`` and reads ``ru_maxrss``. The
growth is the parameters, the vector and the product's peak workspace, which is what
:func:`torch_linop.planning.plan` predicts for a single process.

    python benchmarks/planner_rss.py            # the table in docs/howto/llm_scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# tiny Llama-style models whose product workspace (50-300 MB) dominates the RSS noise
CONFIGS: dict[str, dict[str, Any]] = {
    "h128-L2-V4000": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=4000,
        batch=4,
        seq=256,
    ),
    "h256-L4-V8000-gqa": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8000,
        batch=2,
        seq=256,
    ),
    "h64-L4-V32000": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        batch=4,
        seq=128,
    ),
}


def _llama_config(sizes: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    model_sizes = {key: value for key, value in sizes.items() if key not in ("batch", "seq")}
    return LlamaConfig(**model_sizes, max_position_embeddings=1024)


def _child(name: str, curvature: str) -> None:
    """Runs in the subprocess: prints the RSS growth (bytes) of build + one product."""
    import ctypes
    import gc
    import resource

    import torch

    from torch_linop import GGNOperator, HessianOperator, hf_lm_loss

    torch.set_num_threads(1)
    operator_class = HessianOperator if curvature == "hessian" else GGNOperator

    def product(sizes: dict[str, Any], seed: int) -> None:
        torch.manual_seed(seed)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(_llama_config(sizes)).eval()
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(
            0, sizes["vocab_size"], (sizes["batch"], sizes["seq"]), generator=generator
        )
        operator = operator_class(model, [{"input_ids": tokens}], hf_lm_loss())
        vector = torch.randn(operator.shape[0], generator=generator)
        operator @ vector

    toy = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
        batch=1,
        seq=8,
    )
    product(toy, 0)  # imports and first-call paths, before the baseline
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: not reused unseen
    before = _resident_bytes()  # now, not the high-water mark of the imports
    reset = _reset_peak_resident()  # else ru_maxrss may still hold the imports' peak
    product(CONFIGS[name], 1)
    if reset:
        after = _peak_resident_bytes()
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"measured_bytes": after - before, "baseline_bytes": before}))


def _reset_peak_resident() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the
    peak read after the product is the product's, not an earlier one; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _peak_resident_bytes() -> int:
    """The process's peak resident set since the last reset (VmHWM in /proc/self/status)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM line in /proc/self/status")


def _resident_bytes() -> int:
    """The process's resident set now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, curvature: str) -> int:
    """Measured peak RSS growth in bytes of building ``CONFIGS[name]`` and one product."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, __file__, "--child", name, curvature],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-2000:])
    return int(json.loads(completed.stdout.strip().splitlines()[-1])["measured_bytes"])


def predict(name: str, curvature: str) -> int:
    """The planner's single-process peak (parameters + vector + product) in bytes."""
    import torch

    from torch_linop.planning import plan

    sizes = CONFIGS[name]
    result = plan(
        _llama_config(sizes),
        curvature=curvature,
        dtype=torch.float32,
        seq_len=sizes["seq"],
        micro_batch=sizes["batch"],
        tokens_per_rank=sizes["batch"] * sizes["seq"],
        device_memory=None,
        basis_device="cpu",
    )
    return result.product_peak_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "CURVATURE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    print("| model | tokens | curvature | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|")
    for name, sizes in CONFIGS.items():
        for curvature in ("hessian", "ggn"):
            predicted, measured = predict(name, curvature), measure(name, curvature)
            print(
                f"| {name} | {sizes['batch']}x{sizes['seq']} | {curvature} | "
                f"{predicted / 2**20:.1f} | {measured / 2**20:.1f} | "
                f"{100 * (predicted - measured) / measured:+.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
