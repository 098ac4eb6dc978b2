"""What the ce_hvp autotuners picked and timed, and the occupancy they found, for benchmark reports.

The kernels keep these in module-private tables (``_tuned``, ``_tuning_timings``, ``_occupancy``)
and export nothing for them: only the benchmarks read them, through this module.
"""

from __future__ import annotations

from typing import Any


def tuned_configs(kernel_module: Any) -> dict[tuple, Any]:
    """Best config per tuning key picked so far by a kernel module's autotuner."""
    return dict(kernel_module._tuned)


def tuning_timings(kernel_module: Any) -> dict[tuple, dict[Any, float]]:
    """Median ms of every candidate the kernel module's autotuner timed, per tuning key."""
    return {key: dict(timings) for key, timings in kernel_module._tuning_timings.items()}


def occupancy_report() -> list[dict]:
    """Resident programs per SM found for each compiled persistent two-pass-style kernel."""
    from torch_linop.kernels import _ce_hvp_two_pass as two_pass

    return [
        {
            "kernel": key[0],
            "num_warps": key[2],
            "constexprs": dict(key[3]),
            "programs_per_sm": resident,
            "error": two_pass._occupancy_errors.get(key),
        }
        for key, resident in two_pass._occupancy.items()
    ]
