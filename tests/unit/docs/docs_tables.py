"""Reading the docs' Markdown tables, for the checks of tests/unit/docs."""

from __future__ import annotations


def table_rows(text: str, first: str) -> list[list[str]]:
    """Rows (cells) of the first table in `text` whose header's first cell is `first`
    (case-insensitive); [] when there is none."""
    rows: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not inside and line.startswith("|") and cells[0].lower() == first:
            inside = True
        elif inside and line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append(cells)
        elif inside:
            break
    return rows
