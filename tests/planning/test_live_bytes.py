"""LiveBytes counts the bytes of storages created under it, frees them when they die, ignores
views of tensors made before it, and lets scalar reads of meta tensors through."""

from __future__ import annotations

import torch

from torch_linop.planning import LiveBytes

FLOAT = 4  # bytes of a float32 entry


def test_counts_created_storages_and_their_release() -> None:
    with LiveBytes() as counter:
        first = torch.empty(1000, device="meta")
        second = first * 2  # a new storage: 1000 + 1000 entries alive
        assert counter.current == 2000 * FLOAT
        del first
        assert counter.current == 1000 * FLOAT
        third = torch.empty(500, device="meta")  # below the earlier peak
        assert counter.current == 1500 * FLOAT
        view = second.view(10, 100)  # shares the storage: nothing new
        assert counter.current == 1500 * FLOAT
        del second, third, view
    assert counter.peak == 2000 * FLOAT
    assert counter.current == 0


def test_storages_grown_in_place_count_their_growth() -> None:
    with LiveBytes() as counter:
        grown = torch.empty(0, device="meta")
        grown.resize_(100)
        torch.add(torch.empty(30, device="meta"), 1, out=grown)  # out= shrinks nothing
        del grown
    assert counter.peak == 130 * FLOAT


def test_views_of_tensors_made_before_are_not_memory() -> None:
    weight = torch.empty(100, 100, device="meta")
    with LiveBytes() as counter:
        transposed = weight.t()
        rows = weight[:10]
        product = transposed @ rows.T  # (100, 10): the only new storage
    assert counter.peak == 100 * 10 * FLOAT
    del transposed, rows, product


def test_watched_bytes_at_the_peak() -> None:
    with LiveBytes() as counter:
        counter.watch("wide", lambda tensor: tensor.shape[-1] == 50)
        wide = torch.empty(4, 50, device="meta")
        narrow = torch.empty(4, 3, device="meta")
        del wide, narrow
    assert counter.tags_at_peak == {"wide": 4 * 50 * FLOAT}


def test_scalar_reads_of_meta_tensors_pass() -> None:
    with LiveBytes():
        loss = torch.empty((), device="meta")
        assert bool(torch.isfinite(loss))
        assert int(torch.empty(3, device="meta").sum()) == 1
