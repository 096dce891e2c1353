"""Output for the terminal, the same on every command (``--json`` is the machine form).

Text that nodes supplied (check messages, entities, labels, reasons) reaches
the terminal only through :func:`clean`: escape sequences and other control
characters are removed, so a node cannot move the cursor, retitle the window,
hide a line or ring the bell on an operator's terminal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: ESC sequences (CSI ``ESC [ … final``, OSC ``ESC ] … BEL/ST``, DCS/PM/APC/SOS ``… ST``, two-byte ``ESC x``),
#: their 8-bit C1 forms, then any other C0/C1 control character.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` safe for a terminal: escapes and control characters gone, tabs (and newlines) as spaces."""
    value = _CONTROL.sub("", _ESCAPES.sub("", str(text).replace("\t", " ")))
    return value if keep_newlines else value.replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last column, free text, is not padded."""
    cleaned = [[clean(cell) for cell in row] for row in rows]
    widths = [max(len(header), *(len(row[i]) for row in cleaned)) if cleaned else len(header)
              for i, header in enumerate(headers[:-1])]
    lines = []
    for cells in [[clean(header) for header in headers], *cleaned]:
        lines.append("  ".join([*(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)),
                                cells[-1]]).rstrip())
    return "\n".join(lines) + "\n"
