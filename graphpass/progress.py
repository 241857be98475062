"""Progress of a long step: a tqdm bar on a terminal, one line in a log.

    bar(items, "calibrate", "batch")   stderr is a terminal: tqdm redraws one line in place
                                       otherwise: `calibrate: 32/32 batches, 35.1 s` once the
                                       items are exhausted (nothing if the step fails)
    bar(items, ..., enabled=False)     the items, nothing printed
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def bar(items: Iterable, desc: str, unit: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """`items`, wrapped so their progress is shown as suits stderr (see the module docstring)."""
    if not enabled:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, unit=unit)
    return _Quiet(items, desc, unit, total)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # replaced or closed stream
        return False


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class _Quiet:
    """Iterates `items`; prints one summary line to stderr when they run out."""

    def __init__(self, items: Iterable, desc: str, unit: str, total: int | None):
        self.items, self.desc, self.unit, self.total = items, desc, unit, total

    def __iter__(self) -> Iterator:
        t0, n = time.perf_counter(), 0
        for x in self.items:
            yield x
            n += 1
        done = f"{n}/{self.total}" if self.total is not None else str(n)
        print(f"{self.desc}: {done} {_plural(self.unit, self.total if self.total is not None else n)}, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
