"""search/blas.heap_scratch: weight-sized temporaries reused from the heap inside, nested blocks
keep the outer one's heap, and the fixed mmap threshold returns when the outermost exits.
Measured by the page faults of allocating and freeing a 1 MB array 50 times (each fresh mmap
faults ~256 pages; a reused heap block none). Not 4 MB: numpy asks for transparent huge pages on
arrays of 4 MB and more, and whether a fresh mmap then faults 2 MB pages or 4 kB ones depends on
where it lands. Counted in a fresh interpreter: in the test process, free chunks that earlier
tests left in the heap serve the arrays without an mmap (two clean-clone CI runs read 513 and
256 faults "outside")."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from graphpass.graph.runtime import glibc

ROUNDS = 50
FEW = ROUNDS * 10          # page faults: reused blocks stay far below, fresh mmaps far above (~ROUNDS * 256)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or glibc() is None,
                                reason="glibc's mallopt only")

CHILD = f"""
import json, resource
import numpy as np
from graphpass.graph.runtime import fixed_mmap_threshold
from graphpass.search.blas import heap_scratch

def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({ROUNDS}):
        a = np.ones(1 << 18, np.float32)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

fixed_mmap_threshold()
out = {{"outside": faults()}}
with heap_scratch():
    faults()                                   # the heap grows once
    out["inside"] = faults()
    with heap_scratch(1 << 19):
        faults()
    out["after_inner"] = faults()              # the inner exit left the outer heap in place
out["after"] = faults()
print(json.dumps(out))
"""


def test_nested_scratch_keeps_the_outer_heap_and_the_outermost_exit_restores():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout.strip().splitlines()[-1])
    assert f["outside"] > 10 * FEW, f         # every array a fresh mmap
    assert f["inside"] < FEW, f
    assert f["after_inner"] < FEW, f
    assert f["after"] > 10 * FEW, f           # the outermost exit restored the fixed threshold
