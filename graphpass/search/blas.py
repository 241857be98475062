"""One BLAS thread for the searches' many small matrix products.

The searches multiply [<=256, C] rows by [C, <=N] weights thousands of times. numpy's OpenBLAS
splits each product over every core and synchronizes its threads per call; on a loaded 2-core
machine (load 20) a 128 x 384 x 384 product took 93 ms with 2 threads and 5.6 ms with 1 (17x).
`one_blas_thread()` sets numpy's OpenBLAS to one thread and restores the count on exit; where no
OpenBLAS is loaded (another BLAS), it does nothing. `heap_scratch()` lets the searches' many
temporaries of a few MB come from the heap instead of fresh zero-filled mmaps.
"""
from __future__ import annotations

import contextlib
import ctypes


def _openblas():
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
    except OSError:
        return None, None
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
            get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None, None


@contextlib.contextmanager
def one_blas_thread():
    import numpy  # noqa: F401 -- loads the BLAS this looks for

    get, put = _openblas()
    if get is None:
        yield
        return
    before = int(get())
    put(1)
    try:
        yield
    finally:
        put(before)


KEEP_TOP = 1 << 30        # heap_scratch: glibc keeps a free heap top up to this size
TRIM_DEFAULT = 128 << 10  # glibc's default M_TRIM_THRESHOLD


@contextlib.contextmanager
def heap_scratch(nbytes: int = 1 << 25):
    """Temporaries up to `nbytes` come from the heap inside (glibc, Linux).

    graphpass fixes glibc's mmap threshold at 128 kB (graph/runtime.fixed_mmap_threshold), so
    that freed activations go back to the OS. A search allocates and frees arrays of a few MB
    thousands of times; each one mmapped is zero-filled page by page by the kernel again (on
    SmolLM2's w4 quantize, 38 of 143 CPU seconds were system time). Inside, such blocks are reused
    from the heap, which also keeps its free top (glibc otherwise gives back any free top past
    128 kB at once, and the next block is zero-filled again: with-past SmolLM2, token α auto,
    after calibration 7.0 M page faults and 16.9 s of system time -> 2.1 M and 9.1 s). Nested,
    the innermost `nbytes` holds; when the outermost exits, the fixed threshold and the default
    trim threshold are set again and the heap's free memory returned.
    """
    from graphpass.graph.runtime import fixed_mmap_threshold, glibc

    libc = glibc()
    if libc is None:
        yield
        return
    _SCRATCH.append(int(nbytes))
    libc.mallopt(-3, int(nbytes))           # M_MMAP_THRESHOLD
    libc.mallopt(-1, KEEP_TOP)              # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        _SCRATCH.pop()
        if _SCRATCH:
            libc.mallopt(-3, _SCRATCH[-1])
        else:
            fixed_mmap_threshold()
            libc.mallopt(-1, TRIM_DEFAULT)
            libc.malloc_trim(0)


_SCRATCH: list[int] = []     # the nbytes of the heap_scratch blocks open now, outermost first
