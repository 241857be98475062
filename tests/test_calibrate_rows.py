"""Sampled calibration rows parked on disk during calibration (calibrate/rows.py) come back as
they went in: per tensor, in arrival order, with their dtype; the file goes with the spill."""
from __future__ import annotations

import os

import numpy as np

from graphpass.calibrate.rows import RowSpill


def test_rows_come_back_in_order_per_tensor():
    rng = np.random.default_rng(0)
    pieces = {"a": [rng.standard_normal((k, 5)).astype(np.float32) for k in (3, 0, 2)],
              "b": [rng.standard_normal((1, 7)) for _ in range(4)]}          # float64 kept
    with RowSpill() as spill:
        for k in range(4):                      # interleaved, as batches deliver them
            for t, ps in pieces.items():
                if k < len(ps):
                    spill.add(t, ps[k])
        assert spill.names() == ["a", "b"]
        for t, ps in pieces.items():
            got = spill.take(t)
            assert got.dtype == ps[0].dtype and np.array_equal(got, np.concatenate(ps))
        fd = spill._f.fileno()
    try:
        os.fstat(fd)
        closed = False
    except OSError:
        closed = True
    assert closed


def test_calibration_rows_are_the_sampled_rows(synth):
    """The rows that calibrate returns are rows of the tensor it calibrated: each lies inside the
    per-channel range of the same run."""
    from graphpass.calibrate.collect import calibrate

    s = synth("llama")
    st = calibrate(s.path, s.data, batch_size=2, progress=False, row_step=4)
    assert st.rows and set(st.rows) == set(st.min)
    for t, x in st.rows.items():
        assert x.ndim == 2 and x.shape[1] == st.min[t].size and len(x) > 0
        assert (x >= st.min[t]).all() and (x <= st.max[t]).all()


def test_reads_leave_the_file_position_alone():
    """GPTQ's workers read Grams from two threads: a read is positioned (pread), it neither moves
    nor depends on the file's offset, and the rows come back whole."""
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 6)).astype(np.float32) for n in (4, 1, 3)]
    with RowSpill() as spill:
        for x in parts:
            spill.add("a", x)
            spill.add("b", x + 1)
        spill._f.seek(5)
        assert np.array_equal(spill.read("a"), np.concatenate(parts))
        assert spill._f.tell() == 5
        assert np.array_equal(spill.read("b"), np.concatenate(parts) + 1)
