"""Shared bits of the benchmark scripts: a plain table and JSON output."""

from __future__ import annotations

import json
from pathlib import Path


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    """Print rows as an aligned text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if title:
        print(title)
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in pairs))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def write_json(path: str | None, doc: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
