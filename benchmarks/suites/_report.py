"""What a suite hands back: markdown tables for people, records for the JSON file."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """One markdown table: a title, column names, rows of cells, and notes printed under it."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(format_cell(cell) for cell in row) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class SuiteResult:
    """Tables (markdown) and flat records (JSON) of one suite run, plus suite-level notes."""

    suite: str
    tables: list[Table] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)  # ready-made markdown (delegated suites)


def progress(suite: str, message: str) -> None:
    """One line of progress on stderr (long runs: the tables only print at the end)."""
    print(f"[{suite}] {message}", file=sys.stderr, flush=True)


def format_cell(cell: Any) -> str:
    """Numbers in a compact fixed form; None as an em dash; text with pipes escaped."""
    if cell is None:
        return "—"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, int):
        return f"{cell:,}"
    if isinstance(cell, float):
        if math.isnan(cell):
            return "nan"
        if math.isinf(cell):
            return "inf"
        magnitude = abs(cell)
        if magnitude != 0 and (magnitude < 1e-2 or magnitude >= 1e5):
            return f"{cell:.1e}"
        return f"{cell:.3g}" if magnitude < 100 else f"{cell:.0f}"
    return str(cell).replace("|", "\\|").replace("\n", " ")


def short_error(error: BaseException, limit: int = 140) -> str:
    """First line of an exception, prefixed with its type, cut to ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return message if len(message) <= limit else message[: limit - 1] + "…"
