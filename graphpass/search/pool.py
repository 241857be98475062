"""The searches' per-site work on both cores, in order, with the graph read in one thread.

A search scores each site (or weight) on its own: `work(*prepare(item))` per item. `prepare`
reads weights from the graph (lazy external data: not thread safe) in the calling thread;
`work` (numpy and BLAS, which release the GIL) runs in up to `workers` threads. Results come
back in item order, so every choice is the one a single thread would make; at most
2 · workers prepared items wait, so memory stays that of a few sites' weights. Stopped early (an
exception or Ctrl-C where the results are read), the items already running finish; the queued ones
do not start.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

WORKERS = 2


def ordered_map(prepare: Callable, work: Callable, items: Iterable, workers: int = WORKERS) -> Iterator:
    """(item, work(*prepare(item))) for each item whose prepare(item) is not None, in order."""
    if workers <= 1:
        for it in items:
            args = prepare(it)
            if args is not None:
                yield it, work(*args)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(workers) as ex:
        try:
            for it in items:
                args = prepare(it)
                if args is not None:
                    pending.append((it, ex.submit(work, *args)))
                while len(pending) > 2 * workers:
                    done, fut = pending.popleft()
                    yield done, fut.result()
            while pending:
                done, fut = pending.popleft()
                yield done, fut.result()
        finally:     # closed early (an error or Ctrl-C): items not started are dropped, not run
            for _, fut in pending:
                fut.cancel()
