"""Per-tensor Gram matrices X^T·X of calibration rows (GPTQ's Hessian), computed when read.

For a linear input X, flattened to F [rows, C], the calibration graph also returns the rows
S = F[0::step] (every step-th row; calibrate/collect.add_reductions, placed with the other
reductions of X). They are appended to a temporary file as they arrive
(calibrate/rows.RowSpill) and `Grams[t]` returns S^T·S [C, C] (float32) over all of them when
GPTQ asks for it: H = 2/n · S^T·S is the Hessian of ||X·W − X·Q||² that GPTQ (search/gptq.py)
inverts, one input at a time. The rows come from every calibration token (thinned by `step`,
default 4: 4,096 rows over 32 x 512 tokens, above the widest C of SmolLM2, 1,536, so H has full
rank), where the sampled rows kept for the searches (every 64th: 256 rows) would leave H of rank 256.
Memory: one S and one Gram at a time per reader (SmolLM2: 25 + 9 MB) instead of every sum at once
(Σ C² · 4 bytes: 405 MB over SmolLM2's 121 linear inputs, held from the calibration session's peak
to the end of GPTQ); the file takes rows · Σ C · 4 bytes of disk (1.6 GB there). Reads may come
from several threads at once (positioned reads).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from graphpass.calibrate.rows import RowSpill

GRAM_STEP = 4


class Grams(Mapping):
    """Tensor name -> S^T·S [C, C] float32 of its spilled rows S, computed on each read."""

    def __init__(self):
        self._rows = RowSpill()
        self.rows: dict[str, int] = {}        # rows spilled per tensor: n of H = 2/n · S^T·S

    def add(self, t: str, s: np.ndarray) -> None:
        """Park one batch's rows S [n, C] of tensor t."""
        self._rows.add(t, np.asarray(s, np.float32))
        self.rows[t] = self.rows.get(t, 0) + len(s)

    def __getitem__(self, t: str) -> np.ndarray:
        if t not in self.rows:
            raise KeyError(t)
        s = self._rows.read(t)
        return s.T @ s

    def __contains__(self, t) -> bool:
        return t in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self._rows.close()
