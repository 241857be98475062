"""The accuracy metrics of graphpass.evaluate, reduced in row chunks and accumulated: memory is
O(chunk), whatever the vocabulary, the batch or the number of samples.

A row is one position (the leading axes of an output flattened); a chunk is the fewest rows
holding about CHUNK_ELEMENTS values. With r, c the reference and candidate logits of a row,
t its next token (-1 for the last position of a sequence):
  lse(z)  = max z + log sum_v exp(z_v - max z)                      (per row, float64)
  NLL     = lse(z) - z_t                                             (rows with t >= 0)
  KL      = sum_v p_v (log p_v - log q_v),  log p = r - lse(r),  p = exp(log p),  log q = c - lse(c)
  top-1   = [argmax r == argmax c]
  error   = |r - c|: its max and its sum, per output
Encoder: cosine of the reference and candidate vectors of each unmasked row.
Every metric is a ratio of two running sums (Sums), so batches and chunks add up in any order.

Where float64 is used, and why (tests/test_eval_memory.py checks each choice):
  log p, log q, p and their product: in float32 KL moves by more than 1e-6 relative (KL is a
    small difference of O(10) log-probabilities), so these are float64, one chunk at a time;
  every running sum is float64 (Python floats);
  argmax and |r - c| stay float32: argmax is exact on the logits themselves, and |r - c| is
    rounded once (2^-24 relative), then summed in float64.

The reference's side of a row (max, log-sum, argmax) is computed once, while its logits are in
memory (RefRows); the candidate pass reads the reference's logits back a chunk at a time
(FileRows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK_ELEMENTS = 1 << 20          # ~8 MB per float64 temporary; ~40 MB of temporaries in all


def chunk_rows(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(int(width), 1))


def as_rows(a: np.ndarray) -> np.ndarray:
    """[..., width] -> [rows, width] (a view when `a` is contiguous)."""
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


class Sums:
    """Running sums; every metric is a ratio of two of them."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + float(value)

    def max(self, key: str, value: float) -> None:
        self.s[key] = max(self.s.get(key, -np.inf), float(value))

    def min(self, key: str, value: float) -> None:
        self.s[key] = min(self.s.get(key, np.inf), float(value))

    def merge(self, other: "Sums") -> None:
        """Fold in another batch's sums (so both passes sum a batch's chunks in the same order)."""
        for k, v in other.s.items():
            (self.max if k.startswith("max_abs:") else self.min if k == "cos_min" else self.add)(k, v)


# ---------------------------------------------------------------------------- row sources
class ArrayRows:
    """Row ranges of an array in memory."""

    def __init__(self, a: np.ndarray):
        self.a = as_rows(a)
        self.shape = self.a.shape

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self.a[lo:hi]


class FileRows:
    """Row ranges of an .npy file, read with plain reads into one reused buffer: the file's pages
    stay in the page cache, not in this process's resident memory (a memory map would count
    every page touched until it is unmapped)."""

    def __init__(self, path: str | os.PathLike):
        self.f = open(path, "rb")
        version = np.lib.format.read_magic(self.f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(self.f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not written by graphpass")
        self.offset, self.dtype = self.f.tell(), np.dtype(dtype)
        self.shape = (1, 1) if len(shape) == 0 else (int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1]))
        self.buf: np.ndarray | None = None

    def rows(self, lo: int, hi: int) -> np.ndarray:
        n, w = hi - lo, self.shape[1]
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = np.empty((n, w), self.dtype)
        out = self.buf[:n]
        self.f.seek(self.offset + lo * w * self.dtype.itemsize)
        if self.f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise OSError(f"{self.f.name}: file shorter than its header says")
        return out

    def close(self) -> None:
        self.f.close()
        self.buf = None


def write_rows(path: str | os.PathLike, a: np.ndarray) -> None:
    """Save an output for FileRows (C order, no copy when it already is)."""
    np.save(Path(path), np.ascontiguousarray(a))


# ---------------------------------------------------------------------------- causal LM
@dataclass
class RefRows:
    """What the candidate pass needs of the reference besides its logits, per row: max, log of the
    shifted exp-sum (lse = max + log_sum, kept apart so log p is rebuilt with the very operations
    that built log q: a graph against itself gives KL exactly 0) and argmax."""
    max: np.ndarray                 # float64 [rows]
    log_sum: np.ndarray             # float64 [rows]
    top: np.ndarray                 # int64 [rows]

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            np.savez(f, max=self.max, log_sum=self.log_sum, top=self.top)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RefRows":
        with np.load(path) as z:
            return cls(z["max"], z["log_sum"], z["top"])


def next_tokens(ids: np.ndarray) -> np.ndarray:
    """[b, n] token ids -> [b*n] targets: the next token, -1 at each sequence's last position."""
    t = np.full(ids.shape, -1, np.int64)
    t[:, :-1] = ids[:, 1:]
    return t.reshape(-1)


class Work:
    """Chunk-sized scratch arrays reused from chunk to chunk: no allocation per chunk (with glibc's
    mmap threshold fixed, each new 8 MB block would be fresh pages to fault in)."""

    def __init__(self):
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, int], dtype=np.float64) -> np.ndarray:
        b = self.bufs.get(key)
        if b is None or b.size < shape[0] * shape[1] or b.dtype != dtype:
            b = self.bufs[key] = np.empty(shape[0] * shape[1], dtype)
        return b[: shape[0] * shape[1]].reshape(shape)


def _log_softmax(z: np.ndarray, out: np.ndarray, tmp: np.ndarray, m: np.ndarray | None = None,
                 log_sum: np.ndarray | None = None):
    """(log softmax z in float64 (in `out`), max z, log sum exp(z - max z)) for float32 rows z;
    given m and log_sum, the same operations without the exp pass. `tmp`: scratch like `out`."""
    if m is None:
        m = z.max(-1).astype(np.float64)
    x = out
    np.copyto(x, z)
    x -= m[:, None]
    if log_sum is None:
        log_sum = np.log(np.exp(x, out=tmp).sum(-1))
    x -= log_sum[:, None]
    return x, m, log_sum


def _target_nll(logp: np.ndarray, t: np.ndarray) -> tuple[float, int]:
    has = t >= 0
    return float(-logp[has, t[has]].sum()), int(has.sum())


def reference_rows(logits: np.ndarray, targets: np.ndarray, sums: Sums) -> RefRows:
    """Reference side, chunk by chunk: NLL_ref summed, per-row lse and argmax returned."""
    z = as_rows(logits)
    m, log_sum, top = np.empty(len(z)), np.empty(len(z)), np.empty(len(z), np.int64)
    step, w = chunk_rows(z.shape[1]), Work()
    for lo in range(0, len(z), step):
        hi = min(lo + step, len(z))
        shape = (hi - lo, z.shape[1])
        logp, m[lo:hi], log_sum[lo:hi] = _log_softmax(z[lo:hi], w.get("x", shape), w.get("t", shape))
        top[lo:hi] = z[lo:hi].argmax(-1)
        nll, count = _target_nll(logp, targets[lo:hi])
        sums.add("nll_ref", nll)
        sums.add("next_tokens", count)
    sums.add("positions", len(z))
    return RefRows(m, log_sum, top)


def candidate_rows(logits: np.ndarray, targets: np.ndarray, ref, ref_rows: RefRows, sums: Sums,
                   name: str = "logits") -> None:
    """Candidate side: NLL_cand, KL(ref || cand), top-1 and |r - c| of output `name`, chunk by
    chunk; `ref` gives the reference's logits (ArrayRows or FileRows)."""
    c = as_rows(logits)
    if ref.shape != c.shape:
        raise ValueError(f"{name}: reference rows {ref.shape} and candidate rows {c.shape} differ")
    step, w = chunk_rows(c.shape[1]), Work()
    for lo in range(0, len(c), step):
        hi = min(lo + step, len(c))
        r, cc, shape = ref.rows(lo, hi), c[lo:hi], (hi - lo, c.shape[1])
        _error(sums, name, r, cc, w)
        p = w.get("p", shape)
        logq = _log_softmax(cc, w.get("q", shape), p)[0]
        sums.add("nll_cand", _target_nll(logq, targets[lo:hi])[0])
        sums.add("top1", (ref_rows.top[lo:hi] == cc.argmax(-1)).sum())
        logp = _log_softmax(r, w.get("x", shape), p, ref_rows.max[lo:hi], ref_rows.log_sum[lo:hi])[0]
        np.exp(logp, out=p)
        logp -= logq
        logp *= p
        sums.add("kl", logp.sum())


def _error(sums: Sums, name: str, r: np.ndarray, c: np.ndarray, w: Work | None = None) -> None:
    if r.dtype == np.float32 and c.dtype == np.float32:
        d = np.subtract(r, c, out=(w or Work()).get("d", r.shape, np.float32))
        np.abs(d, out=d)
    else:
        d = np.abs(r.astype(np.float64) - c.astype(np.float64))
    sums.max(f"max_abs:{name}", d.max() if d.size else 0.0)
    sums.add(f"sum_abs:{name}", d.sum(dtype=np.float64))
    sums.add(f"count:{name}", d.size)


def error_rows(name: str, ref, cand: np.ndarray, sums: Sums) -> None:
    """max |r - c| and sum |r - c| of one output, chunk by chunk."""
    c = as_rows(cand)
    if ref.shape != c.shape:
        raise ValueError(f"{name}: reference rows {ref.shape} and candidate rows {c.shape} differ")
    if c.size == 0:
        sums.max(f"max_abs:{name}", 0.0)
        sums.add(f"count:{name}", 0)
        return
    step, w = chunk_rows(c.shape[1]), Work()
    for lo in range(0, len(c), step):
        hi = min(lo + step, len(c))
        _error(sums, name, ref.rows(lo, hi), c[lo:hi], w)


# ---------------------------------------------------------------------------- encoder
def encoder_rows(ref, cand: np.ndarray, keep: np.ndarray, sums: Sums, name: str) -> None:
    """Cosine of reference and candidate rows where `keep` (flattened mask), and |r - c|."""
    c = as_rows(cand)
    step, w = chunk_rows(c.shape[1]), Work()
    for lo in range(0, len(c), step):
        hi = min(lo + step, len(c))
        r, cc = ref.rows(lo, hi), c[lo:hi]
        _error(sums, name, r, cc, w)
        k = keep[lo:hi]
        if not k.any():
            continue
        r64, c64 = r[k].astype(np.float64), cc[k].astype(np.float64)
        cos = (r64 * c64).sum(-1) / np.maximum(np.linalg.norm(r64, axis=-1) * np.linalg.norm(c64, axis=-1),
                                                1e-30)
        sums.add("cos", cos.sum())
        sums.add("tokens", len(cos))
        sums.min("cos_min", cos.min())


def encoder_keep(mask: np.ndarray | None, rows_shape: tuple) -> np.ndarray:
    """Flattened attention mask when it matches the output's rows, else every row."""
    rows = rows_shape[0]
    if mask is not None and np.asarray(mask).size == rows:
        return np.asarray(mask).reshape(-1).astype(bool)
    return np.ones(rows, bool)


# ---------------------------------------------------------------------------- result
def summary(s: dict, kind: str, n: int, outs: list[str]) -> dict:
    from graphpass.errors import GraphpassError

    res: dict = {"kind": kind, "samples": n}
    if s.get("next_tokens" if kind == "causal-lm" else "tokens", 0) == 0:
        raise GraphpassError("no token to score: sequences need 2+ tokens (causal-lm) "
                             "or an attention mask with ones (encoder)")
    if kind == "causal-lm":
        res.update(
            perplexity_reference=float(np.exp(s["nll_ref"] / s["next_tokens"])),
            perplexity_candidate=float(np.exp(s["nll_cand"] / s["next_tokens"])),
            kl=max(0.0, s["kl"] / s["positions"]),
            top1=s["top1"] / s["positions"],
            tokens=int(s["positions"]),
        )
    else:
        res.update(cosine_mean=s["cos"] / s["tokens"], cosine_min=s["cos_min"], tokens=int(s["tokens"]))
    res["outputs"] = {o: {"max_abs": s[f"max_abs:{o}"], "mean_abs": s[f"sum_abs:{o}"] / max(s[f"count:{o}"], 1)}
                      for o in outs}
    return res
