"""One BLAS thread for the searches' many small matrix products.

The searches multiply [<=256, C] rows by [C, <=N] weights thousands of times. numpy's OpenBLAS
splits each product over every core and synchronizes its threads per call; on a loaded 2-core
machine (load 20) a 128 x 384 x 384 product took 93 ms with 2 threads and 5.6 ms with 1 (17x).
`one_blas_thread()` sets numpy's OpenBLAS to one thread and restores the count on exit; where no
OpenBLAS is loaded (another BLAS), it does nothing.
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
