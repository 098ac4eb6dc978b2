"""tqdm progress bars counting matvecs; on by default only when stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(description: str, total: int | None, progress: bool | None) -> tqdm:
    """A bar counting matvecs. ``progress=None``: shown only if stderr is a TTY."""
    if progress is None:
        progress = sys.stderr.isatty()
    elif not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {progress!r}")
    return tqdm(total=total, desc=description, unit="matvec", disable=not progress, leave=False)
