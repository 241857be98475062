"""Sampled rows of calibration tensors, parked on disk while the calibration session runs.

The alpha search needs R sampled rows X_t [R, C_t] of every linear input t. They arrive a few per
batch while onnxruntime holds the model's weights and its activations; kept in memory they add
R · Σ_t C_t · 4 bytes on top of that peak (SmolLM2, 32 x 512 tokens, every 64th row: 101 MB).
Here each piece is appended to an anonymous temporary file as it comes, and `take(t)` reads X_t
back (pieces in arrival order) once the session is gone: the rows are then the same arrays, read
when the memory the session held has been returned.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np


class RowSpill:
    def __init__(self):
        self._f = tempfile.TemporaryFile(prefix="graphpass-rows-")
        self._pieces: dict[str, list[tuple[int, tuple[int, ...], np.dtype]]] = {}
        self._end = 0

    def add(self, t: str, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x)
        self._f.seek(self._end)
        x.tofile(self._f)
        self._pieces.setdefault(t, []).append((self._end, x.shape, x.dtype))
        self._end += x.nbytes

    def names(self) -> list[str]:
        return list(self._pieces)

    def take(self, t: str) -> np.ndarray:
        """All rows of `t` in arrival order, concatenated on the first axis; forgotten here."""
        x = self.read(t)
        del self._pieces[t]
        return x

    def read(self, t: str) -> np.ndarray:
        """All rows of `t` in arrival order, concatenated on the first axis; kept on disk. Read
        into one array with positioned reads: threads may read at once (nothing is added then)."""
        self._f.flush()
        pieces = self._pieces[t]
        shape, dtype = pieces[0][1], pieces[0][2]
        out = np.empty((sum(p[1][0] for p in pieces), *shape[1:]), dtype)
        at = 0
        for offset, shp, _ in pieces:
            part = out[at:at + shp[0]]
            at += shp[0]
            if part.nbytes and os.preadv(self._f.fileno(), [part.reshape(-1).view(np.uint8)], offset) != part.nbytes:
                raise OSError(f"graphpass: the row spill file is short for tensor '{t}'")
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RowSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
