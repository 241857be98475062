"""search/blas.heap_scratch: weight-sized temporaries reused from the heap inside, nested blocks
keep the outer one's heap, and the fixed mmap threshold returns when the outermost exits.
Measured by the page faults of allocating and freeing a 4 MB array 50 times (each fresh mmap
faults ~1,000 pages; a reused heap block none)."""
from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from graphpass.graph.runtime import fixed_mmap_threshold
from graphpass.search.blas import _libc, heap_scratch

ROUNDS = 50
FEW = ROUNDS * 10          # page faults: reused blocks stay far below, fresh mmaps far above (~ROUNDS * 1024)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None,
                                reason="glibc's mallopt only")


def _faults() -> int:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        a = np.ones(1 << 20, np.float32)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def test_nested_scratch_keeps_the_outer_heap_and_the_outermost_exit_restores():
    fixed_mmap_threshold()
    assert _faults() > 10 * FEW                 # outside: every array a fresh mmap
    with heap_scratch():
        _faults()                               # the heap grows once
        assert _faults() < FEW
        with heap_scratch(1 << 20):
            _faults()
        assert _faults() < FEW                  # the inner exit left the outer heap in place
    assert _faults() > 10 * FEW
