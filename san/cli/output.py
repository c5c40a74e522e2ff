"""Human output for the CLI: aligned tables like lvs, key/value listings, and a progress bar.

Control characters in what the server sends are shown escaped, never sent to the terminal; --json prints the API's
answer as it is (JSON escapes them)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from san.model import printable

plain = printable


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned: text left, numbers right."""
    cells = [[plain(c) for c in headers]] + [[plain(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_numeric(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] == "-") and text[-1] in "0123456789BKMGTPE%"


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{plain(k) + ':':<{width + 1}} {plain(v)}" for k, v in pairs)


def progress(fraction: float, label: str, width: int = 40) -> None:
    """Draw (or redraw) a progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return
    filled = int(width * fraction)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}%")
    if fraction >= 1:
        sys.stderr.write("\n")
    sys.stderr.flush()
