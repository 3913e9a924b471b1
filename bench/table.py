"""A result table: what every benchmark returns, printed as aligned plain text or saved as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Cell", "Table", "format_cell"]

Cell = str | int | float | None


def format_cell(value: Cell) -> str:
    """Numbers with as many decimals as their size deserves; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


@dataclass(slots=True)
class Table:
    """Rows of raw values (kept raw for JSON) under named columns, plus free-text notes."""

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def render(self, machine: str | None = None) -> str:
        """The table as text: title, machine line, header, rule, rows, notes.

        Text columns are left-aligned, numeric columns right-aligned.
        """
        shown = [[format_cell(c) for c in row] for row in self.rows]
        widths = [len(name) for name in self.columns]
        for row in shown:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        numeric = [
            bool(self.rows)
            and all(isinstance(row[i], int | float) or row[i] is None for row in self.rows)
            for i in range(len(self.columns))
        ]

        def line(cells: list[str]) -> str:
            parts = [
                c.rjust(w) if num else c.ljust(w)
                for c, w, num in zip(cells, widths, numeric, strict=True)
            ]
            return "  ".join(parts).rstrip()

        out = [self.title, "=" * len(self.title)]
        if machine:
            out.append(machine)
        out.append("")
        out.append(line(list(self.columns)))
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(row) for row in shown)
        if self.notes:
            out.append("")
            out.extend(f"* {note}" for note in self.notes)
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
