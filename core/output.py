"""Tables for the terminal, the same on every command (``--json`` is the machine form)."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last column, free text, is not padded."""
    widths = [max(len(header), *(len(row[i]) for row in rows)) if rows else len(header)
              for i, header in enumerate(headers[:-1])]
    lines = []
    for row in [list(headers), *rows]:
        cells = [str(cell).replace("\n", " ") for cell in row]
        lines.append("  ".join([*(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)),
                                cells[-1]]).rstrip())
    return "\n".join(lines) + "\n"
