"""One-column products on kept graphs, captured in a CUDA graph and replayed (``cuda_graph=True``).

A product on a kept graph launches the same kernels on the same buffers every time; what differs
is the vector. At small batches the host cannot dispatch a dual-number forward pass (thousands of
operations with forward-mode bookkeeping) as fast as the GPU runs it: measured on GPT-2 small
(H200), the cached GGN product took 2.69x a gradient eagerly and 2.13x replayed at 8x256 tokens,
2.04x and 1.87x at 8x512 (benchmarks/lm_ggn.py). The
capture follows PyTorch's recipe: warm-up products on a side stream (kernels compiled and tuned,
library handles made for that stream), then the capture on the same stream. Only one-column
products are captured (what Lanczos, power iteration and SLQ call in their loops): each capture
keeps a private memory pool the size of one product's temporaries.

The kept graphs are built on that side stream too: autograd runs a backward op on the stream of
its forward op, and a backward captured on the side stream over a graph recorded on the legacy
default stream would make that stream wait on the capture, which CUDA forbids (the capture is
invalidated: seen on an H100 with a small GPT-2, 2026-12-07).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Capture:
    graph: Any  # torch.cuda.CUDAGraph
    vector: torch.Tensor  # the static input: a product's column is copied in before a replay
    product: torch.Tensor  # the static output, overwritten by every replay


class CapturedProduct:
    """The one-column product of an operator with kept graphs, replayed from a CUDA graph.

    ``key`` identifies the kept graphs the capture used (their buffers are baked into it): a new
    key recaptures. When capturing fails (an operation that synchronises with the host, such as
    a finite-difference step or a sampled MC Fisher target, or a collective of a process group),
    a warning says so once and the products run eagerly from then on.
    """

    def __init__(self) -> None:
        self._capture: _Capture | None = None
        self._key: Any = None
        self._stream: Any = None  # torch.cuda.Stream: kept graphs, captures and replays
        self.failed = False

    def clear(self) -> None:
        """Drop the capture and its memory pool."""
        self._capture = None
        self._key = None

    @contextlib.contextmanager
    def on_side_stream(self, device: torch.device) -> Iterator[None]:
        """Run the body on the operator's side stream, ordered after and before the caller's
        stream (a no-op off CUDA). Tensors the body returns must be ``record_stream``-ed."""
        if device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        side, caller = self._stream, torch.cuda.current_stream(device)
        side.wait_stream(caller)
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            caller.wait_stream(side)

    def __call__(
        self, product: Callable[[torch.Tensor], torch.Tensor], column: torch.Tensor, key: Any
    ) -> torch.Tensor | None:
        """``product(column)`` by replay (``column`` is ``(n, 1)``), capturing first when the
        key changed; ``None`` once capturing has failed (the caller multiplies eagerly)."""
        if self.failed:
            return None
        if self._capture is None or key != self._key:
            self.clear()
            try:
                self._capture = _capture(product, column)
            except Exception as error:  # the eager product decides whether it is a real error
                self._give_up(error, column.device)
                return None
            self._key = key
        capture = self._capture
        capture.vector.copy_(column)
        capture.graph.replay()
        return capture.product.clone()

    def _give_up(self, error: Exception, device: torch.device) -> None:
        self.failed = True
        self._stream = None  # its allocations may still be routed to the failed capture's pool
        warnings.warn(
            f"cuda_graph=True: capturing the product failed ({type(error).__name__}: "
            f"{str(error)[:200]}); products run without CUDA graphs from now on (the same "
            "numbers). Pass cuda_graph=False to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        torch.cuda.synchronize(device)
        _leave_capture_mode(device)


def _capture(product: Callable[[torch.Tensor], torch.Tensor], column: torch.Tensor) -> _Capture:
    """Warm-up products and the capture, on the current (side) stream."""
    vector = column.clone()
    stream = torch.cuda.current_stream(column.device)
    for _ in range(2):  # kernels loaded and tuned, per-stream handles and workspaces made
        product(vector)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        output = product(vector)
    return _Capture(graph, vector, output)


def _leave_capture_mode(device: torch.device) -> None:
    """After a failed capture, torch leaves the CUDA random generator in capture mode (its
    ``capture_end`` raises before the epilogue), so the next ``torch.randn`` on the device
    fails; one small successful capture on a fresh stream resets it."""
    if device.type != "cuda":
        return
    scratch = torch.zeros(1, device=device)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            scratch.add_(1)
    except Exception:  # nothing more to do: the products run eagerly either way
        pass
