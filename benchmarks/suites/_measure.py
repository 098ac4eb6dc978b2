"""Peak memory of one call and the helpers for timing it, the same way for every library.

Time (in the suites): ``time.perf_counter`` around the call, with ``synchronize`` on both sides
on a GPU. Peak memory: on a GPU,
``torch.cuda.max_memory_allocated`` during the call minus what was allocated before the
operator was built (so state an operator keeps between calls, such as a cached graph, counts);
on the CPU, the peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size before the operator was built, with freed
heap returned to the system first (``malloc_trim``) so earlier runs do not hide later peaks.
"""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from typing import Any

import torch

_LIBC: Any = None


def freeze_heap() -> None:
    """Collect garbage once, then exempt every live object (imported modules, models) from
    later collections, so the collections between measurements stay cheap."""
    gc.collect()
    gc.freeze()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS reflects live memory."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryProbe:
    """Peak memory of calls relative to a baseline taken at construction (bytes).

    ``peak(fn)`` runs ``fn`` once and returns ``(result, peak_bytes)``; ``peak_bytes`` is None
    when the platform offers no way to measure it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline: int | None
        gc.collect()
        _trim_heap()
        if device.type == "cuda":
            synchronize(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            rss = _status_kib("VmRSS")
            self.baseline = None if rss is None else rss * 1024

    def peak(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = fn()
            synchronize(self.device)
            return result, torch.cuda.max_memory_allocated(self.device) - (self.baseline or 0)
        _trim_heap()
        if self.baseline is None or not _reset_peak_rss():
            return fn(), None
        result = fn()
        peak = _status_kib("VmHWM")
        return result, None if peak is None else max(peak * 1024 - self.baseline, 0)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 (inf if the reference is zero)."""
    value64 = value.detach().reshape(-1).to("cpu", torch.float64)
    reference64 = reference.detach().reshape(-1).to("cpu", torch.float64)
    norm = float(torch.linalg.vector_norm(reference64))
    diff = float(torch.linalg.vector_norm(value64 - reference64))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20
