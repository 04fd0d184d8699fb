"""Shared bits of the benchmark scripts: a plain table and JSON output."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    """Print rows as an aligned text table; ``columns`` are (key, header) pairs."""
    header = [h for _, h in columns]
    body = [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = _widths([header, *body])
    if title:
        print(title)
    print(_aligned(header, widths, numbers=False))
    print("  ".join("-" * w for w in widths))
    for row in body:
        print(_aligned(row, widths, numbers=True))


def _widths(cells: list[list[str]]) -> list[int]:
    """The width of each column: its longest cell."""
    return [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]


def _aligned(row: list[str], widths: list[int], numbers: bool) -> str:
    """One table line: the header and text cells left-aligned, numbers (and lists of them) right-aligned
    below the header."""
    return "  ".join(c.rjust(w) if numbers and i and _numeric(c) else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=True)))


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "-[." or cell[:2] == "-.")


def _fmt(v) -> str:
    """A cell: a float with 4 significant digits, or whole when it is 1,000 or more (no exponent)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str | None, doc: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
