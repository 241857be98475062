"""Calibration statistics: per-channel min and max of selected tensors, keyed by tensor name.

Per-channel min/max (over every axis but the last) give everything later passes need:
max|X_j| = max(-min_j, max_j) for smoothing, and after smoothing X' = X/s the per-tensor range
is [min_j(min_j/s_j), max_j(max_j/s_j)] without running the model again. Shards merge by
elementwise min/max. Per-channel Σ_rows |X_j| and the row count give mean|X_j| (AWQ's statistic);
they merge by addition. Stored as .npz without pickles.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphpass.errors import GraphpassError

if TYPE_CHECKING:
    from graphpass.calibrate.gram import Grams

META_KEY = "__graphpass_stats__"
VERSION = 1


@dataclass
class Stats:
    min: dict[str, np.ndarray] = field(default_factory=dict)
    max: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0
    rows: dict[str, np.ndarray] = field(default_factory=dict)   # sampled rows of X (not saved)
    abs_sum: dict[str, np.ndarray] = field(default_factory=dict)   # Σ over rows of |X_j| (float64)
    count: dict[str, int] = field(default_factory=dict)            # rows summed into abs_sum
    kv_absmax: dict[str, np.ndarray] | None = None   # KV-cache statistic of the same runs (calibrate/kv_stat.py; not saved)
    gram: Grams | None = None        # X^T·X of thinned rows, and their count per tensor (GPTQ; not saved)

    def mean_abs(self, t: str) -> np.ndarray:
        """Per-channel mean|X_j| over every calibration row (AWQ's activation statistic)."""
        if t not in self.abs_sum or not self.count.get(t):
            raise GraphpassError(f"stats have no mean|x| for tensor '{t}' (made by an older graphpass?)")
        return self.abs_sum[t] / self.count[t]

    def add_abs(self, t: str, abs_sum: np.ndarray, rows: int) -> None:
        self.abs_sum[t] = self.abs_sum.get(t, 0.0) + abs_sum.astype(np.float64)
        self.count[t] = self.count.get(t, 0) + int(rows)

    def absmax(self, t: str) -> np.ndarray:
        return np.maximum(-self.min[t], self.max[t])

    def update(self, t: str, lo: np.ndarray, hi: np.ndarray) -> None:
        if t in self.min:
            self.min[t] = np.minimum(self.min[t], lo)
            self.max[t] = np.maximum(self.max[t], hi)
        else:
            self.min[t], self.max[t] = lo.copy(), hi.copy()

    def merge(self, other: "Stats") -> "Stats":
        if set(self.min) != set(other.min):
            raise GraphpassError("stats files cover different tensors; were they made for one model?")
        out = Stats(samples=self.samples + other.samples)
        for t in self.min:
            if self.min[t].shape != other.min[t].shape:
                raise GraphpassError(f"stats disagree on the channels of '{t}'")
            out.min[t] = np.minimum(self.min[t], other.min[t])
            out.max[t] = np.maximum(self.max[t], other.max[t])
        for t in set(self.abs_sum) & set(other.abs_sum):   # mean|x| only where both shards have it
            for src in (self, other):
                out.add_abs(t, src.abs_sum[t], src.count[t])
        return out

    def scaled(self, t: str, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (min, max) of X / s."""
        return self.min[t] / s, self.max[t] / s

    def require(self, widths: dict[str, int], what: str = "stats") -> None:
        """Every tensor present with the right channel count, else a one-line error."""
        for t, w in widths.items():
            if t not in self.min:
                raise GraphpassError(f"{what} has no entry for tensor '{t}' (computed for another model?)")
            if self.min[t].shape != (w,):
                raise GraphpassError(f"{what}: tensor '{t}' has {self.min[t].size} channels, "
                                     f"the model has {w} (computed for another model?)")
            if not (np.isfinite(self.min[t]).all() and np.isfinite(self.max[t]).all()):
                raise GraphpassError(f"{what}: tensor '{t}' has NaN or Inf ranges "
                                     "(the model overflowed on the calibration data)")

    def save(self, path: str | os.PathLike) -> Path:
        from graphpass.calibrate.data import save_data

        arrays = {META_KEY: np.array(json.dumps({"version": VERSION, "samples": self.samples}))}
        for t in self.min:
            arrays[f"{t}::min"] = self.min[t].astype(np.float32)
            arrays[f"{t}::max"] = self.max[t].astype(np.float32)
            if t in self.abs_sum:
                arrays[f"{t}::abssum"] = self.abs_sum[t]
                arrays[f"{t}::count"] = np.array([float(self.count[t])])
        return save_data(arrays, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Stats":
        from graphpass.calibrate.data import load_data

        arrays = load_data(path)
        try:
            meta = json.loads(str(arrays.pop(META_KEY)))
            out = cls(samples=int(meta["samples"]))
            for k, v in arrays.items():
                t, _, kind = k.rpartition("::")
                if v.dtype.kind != "f":
                    raise TypeError(k)
                if kind == "abssum":
                    out.abs_sum[t] = v.astype(np.float64)
                elif kind == "count":
                    if v.size != 1 or not np.isfinite(v).all() or v.reshape(-1)[0] < 1:
                        raise ValueError(k)
                    out.count[t] = int(v.reshape(-1)[0])
                else:
                    getattr(out, {"min": "min", "max": "max"}[kind])[t] = v.astype(np.float32)
        except (KeyError, ValueError, TypeError, OverflowError):
            raise GraphpassError(f"{path}: not a graphpass stats file") from None
        if set(out.min) != set(out.max) or out.samples < 0:
            raise GraphpassError(f"{path}: corrupted stats file (min and max entries do not pair up)")
        if set(out.abs_sum) != set(out.count) or not set(out.abs_sum) <= set(out.min) or any(
                out.abs_sum[t].shape != out.min[t].shape for t in out.abs_sum):
            raise GraphpassError(f"{path}: corrupted stats file (mean|x| entries do not pair up with min / max)")
        for t in out.min:
            if out.min[t].ndim != 1 or out.min[t].shape != out.max[t].shape:
                raise GraphpassError(f"{path}: corrupted stats file (tensor '{t}': min {list(out.min[t].shape)}, "
                                     f"max {list(out.max[t].shape)}; expected two vectors of one length)")
        return out
