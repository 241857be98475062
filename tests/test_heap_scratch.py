"""search/blas.heap_scratch: weight-sized temporaries reused from the heap inside, nested blocks
keep the outer one's heap, and the fixed mmap threshold returns when the outermost exits.
Measured by the page faults of allocating and freeing a 1 MB array 50 times (each fresh mmap
faults ~256 pages; a reused heap block none). Not 4 MB: numpy asks for transparent huge pages on
arrays of 4 MB and more, and whether a fresh mmap then faults 2 MB pages or 4 kB ones depends on
where it lands (a clean-clone CI run read 513 faults for 50 fresh 4 MB arrays)."""
from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from graphpass.graph.runtime import fixed_mmap_threshold
from graphpass.search.blas import _libc, heap_scratch

ROUNDS = 50
FEW = ROUNDS * 10          # page faults: reused blocks stay far below, fresh mmaps far above (~ROUNDS * 256)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None,
                                reason="glibc's mallopt only")


def _faults() -> int:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        a = np.ones(1 << 18, np.float32)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def test_nested_scratch_keeps_the_outer_heap_and_the_outermost_exit_restores():
    fixed_mmap_threshold()
    assert _faults() > 10 * FEW                 # outside: every array a fresh mmap
    with heap_scratch():
        _faults()                               # the heap grows once
        assert _faults() < FEW
        with heap_scratch(1 << 19):
            _faults()
        assert _faults() < FEW                  # the inner exit left the outer heap in place
    assert _faults() > 10 * FEW
