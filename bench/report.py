"""What the bench prints: progress on stderr, the report's tables on stdout."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence


class BenchError(Exception):
    """Something the bench needs did not happen (the message says what)."""


def say(message: str) -> None:
    """Progress, on stderr so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics and tables ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def latency_row(name: str, values: Sequence[float]) -> list[str]:
    """A latency table's row: ``name``, p50, p99 and max in ms."""
    return [name, *(ms(percentile(values, q)) for q in (50, 99)), ms(max(values))]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def section(title: str, body: str, notes: Sequence[str] = ()) -> None:
    """Print one part of the report."""
    print(f"\n== {title}\n{body}")
    for note in notes:
        print(f"   {note}")
    sys.stdout.flush()
