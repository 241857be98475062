"""Per-layer error of a rewritten graph against its FP32 reference, streamed: no activation is kept.

For every linear layer Y = X·W of the reference whose output tensor also exists in the candidate
(graphpass and onnxruntime.quantization both keep that name), with Ŷ the candidate's tensor:
  SQNR = 10·log10(Σ Y² / Σ (g·Ŷ − Y)²) dB,   relative L2 = sqrt(Σ (g·Ŷ − Y)² / Σ Y²)
summed over every element of every batch. g = 1, except on the tensors smoothing may rescale
per channel (Ŷ ≈ Y·diag(s)^-1), which the reference's sites name: the input of a smoothed layer
and the output of a layer that absorbed 1/s (value / up projection). There g comes from the
weights (graphpass.debug_gains), else from the first batch, g_j = Σ Y_j² / Σ Y_j Ŷ_j, used when
the median |ln g_j| passes 0.05. A per-channel gain error on those outputs is not counted.
Ŷ carries the error of every layer before it. Two more numbers separate the layer's own share:
  input SQNR : the same measure on X
  layer SQNR : Ŷ against the reference layer run on the candidate's own input,
               Y_loc = (g·X̂)·W, i.e. 10·log10(Σ Y_loc² / Σ (g·Ŷ − Y_loc)²)
Both graphs run in ONE onnxruntime session (graphpass.debug_graph) whose outputs are sums only,
but for layers of >= 16k outputs (an LM head): those return X and Ŷ, and the reference layer
alone is rerun on X in row chunks (graphpass.debug_wide).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from graphpass.progress import bar

from graphpass.calibrate.data import batches, check_data
from graphpass.validate.debug_graph import PREFIX, Merged, build_merged
from graphpass.validate.debug_kv import describe
from graphpass.validate.debug_wide import wide_sums
from graphpass.errors import GraphpassError
from graphpass.graph.io import load_model
from graphpass.graph.runtime import fixed_mmap_threshold

RESCALED = 0.05            # median |ln g_j| above which a tensor counts as rescaled per channel
SORT_KEYS = ("sqnr", "layer")


@dataclass
class LayerError:
    name: str                          # the reference node (linear layer) label
    tensor: str                        # its output tensor, shared by both graphs
    index: int                         # position among the reference's linear layers
    quantized: bool                    # False: the candidate still runs it as a float MatMul/Gemm
    signal: float = 0.0                # Σ Y²
    noise: float = 0.0                 # Σ (g·Ŷ − Y)²
    rescaled: bool = False             # g ≠ 1: the candidate's output is smoothed per channel
    module: str = ""                   # exporter's module path, when the reference records it
    input_sqnr: float | None = None    # dB, None when X has no counterpart in the candidate
    local_signal: float | None = None  # Σ Y_loc²
    local_noise: float | None = None   # Σ (g·Ŷ − Y_loc)²
    note: str = ""                     # why a figure of this row is missing or not exact

    @property
    def label(self) -> str:
        return self.module or self.name

    @property
    def sqnr_db(self) -> float:
        return _db(self.signal, self.noise)

    @property
    def rel_l2(self) -> float:
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else float("inf")

    @property
    def layer_sqnr_db(self) -> float | None:
        return None if self.local_noise is None else _db(self.local_signal, self.local_noise)

    def row(self) -> dict:
        return {"name": self.name, "module": self.module, "tensor": self.tensor, "index": self.index,
                "quantized": self.quantized, "sqnr_db": _finite(self.sqnr_db), "rel_l2": self.rel_l2,
                "rescaled": self.rescaled, "input_sqnr_db": _finite(self.input_sqnr),
                "layer_sqnr_db": _finite(self.layer_sqnr_db), "signal": self.signal, "noise": self.noise,
                **({"note": self.note} if self.note else {})}


@dataclass
class DebugResult:
    layers: list[LayerError]                                   # reference order
    unmatched: list[str] = field(default_factory=list)         # reference layers with no counterpart
    samples: int = 0
    kv_cache: str = ""                                         # what an int8-cache candidate is compared over

    def ranked(self, by: str = "sqnr") -> list[LayerError]:
        """Quantized layers, worst first: lowest SQNR at the output (`sqnr`) or of the layer
        alone (`layer`); ties keep graph order."""
        if by not in SORT_KEYS:
            raise GraphpassError(f"unknown sort key '{by}' (choose {', '.join(SORT_KEYS)})")

        def key(r: LayerError):
            v = r.sqnr_db if by == "sqnr" else r.layer_sqnr_db
            return (float("inf") if v is None else v, r.index)
        return sorted((r for r in self.layers if r.quantized), key=key)

    def to_json(self, by: str = "sqnr") -> dict:
        return {"samples": self.samples, "sorted_by": by, "note": "null dB = no error at all",
                **({"kv_cache": self.kv_cache} if self.kv_cache else {}),
                "ranked": [r.name for r in self.ranked(by)], "layers": [r.row() for r in self.layers],
                "unmatched": self.unmatched}

    def format(self, top: int = 10, by: str = "sqnr") -> str:
        q = self.ranked(by)
        lines = [f"per-layer error over {self.samples} samples: {len(self.layers)} linear layers matched, "
                 f"{len(q)} quantized, {len(self.unmatched)} unmatched; worst {min(top, len(q))} by "
                 f"{'output' if by == 'sqnr' else 'layer'} SQNR",
                 *([f"  {self.kv_cache}"] if self.kv_cache else []),
                 f"  {'rank':>4}  {'layer':<44} {'SQNR dB':>8} {'rel L2':>8} {'input dB':>9} {'layer dB':>9}"]
        for k, r in enumerate(q[:top], 1):
            lines.append(f"  {k:>4}  {r.label[-44:]:<44} {_fmt(r.sqnr_db):>8} {r.rel_l2:>8.4f} "
                         f"{_fmt(r.input_sqnr):>9} {_fmt(r.layer_sqnr_db):>9}")
            if r.note:
                lines.append(f"        ^ {r.note}")
        floats = [r for r in self.layers if not r.quantized]
        for r in floats[:5]:
            lines.append(f"  kept in float: {r.label} (SQNR {_fmt(r.sqnr_db)} dB at its output)")
        if len(floats) > 5:
            lines.append(f"  ... and {len(floats) - 5} more layers in float")
        lines += [f"  unmatched (no tensor of that name in the candidate): {n}" for n in self.unmatched[:5]]
        if len(self.unmatched) > 5:
            lines.append(f"  ... and {len(self.unmatched) - 5} more unmatched")
        return "\n".join(lines)


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else ("inf" if v == float("inf") else f"{v:.2f}")


def debug(reference: str | os.PathLike, candidate: str | os.PathLike, data: dict[str, np.ndarray],
          batch_size: int = 1, threads: int = 2, progress: bool = True, local: bool = True) -> DebugResult:
    """Per-layer SQNR and relative L2 of `candidate` against `reference` over `data`, batch by batch.

    local=False skips the layer-alone comparison (one float MatMul less per layer).
    """
    n = check_data(data, load_model(reference, load_weights=False), "data")
    fixed_mmap_threshold()
    mg = build_merged(Path(reference), Path(candidate), local)
    sess, heads = _session(mg, threads)
    outs, fetch = mg.outputs(), mg.outputs() + mg.wide_outputs()
    at = {o: j for j, o in enumerate(outs)}
    ones = np.ones(1, np.float32)
    gains = {f"gp_dbg_{k}_gain": g if (g := mg.gains.get(t)) is not None and _rescaled(g, mg.rescalable.get(t))
             else ones for k, t in enumerate(mg.tensors)}
    if mg.fit:                     # gains the weights do not give: fitted on the first batch
        vals = _run(sess, outs, {**next(batches(data, batch_size)), **_fed(mg, gains)}, 0)
        for k, t in enumerate(mg.tensors):
            if t in mg.fit:
                g = _gain(*(vals[at[f"gp_dbg_{k}_{x}"]] for x in "abc"), mg.rescalable[t])
                if g is not None:
                    gains[f"gp_dbg_{k}_gain"] = g
    sums = np.zeros(len(outs))
    wide: dict[str, float] = {}
    fed = _fed(mg, gains)
    for k, b in enumerate(bar(batches(data, batch_size), "debug", "batch", -(-n // batch_size), enabled=progress)):
        vals = _run(sess, fetch, {**b, **fed}, k)
        sums += [float(np.sum(v, dtype=np.float64)) for v in vals[:len(outs)]]
        got = dict(zip(fetch[len(outs):], vals[len(outs):]))
        del vals
        for w, head in zip(mg.wide, heads):
            gx = gains[mg.gain_input(mg.pairs[w.i].act)] if w.cand_act else None
            part = wide_sums(w, head, got[w.act], got[PREFIX + w.tensor], got.get(w.cand_act), gx)
            for key, v in part.items():
                wide[key] = wide.get(key, 0.0) + v
        del got
    res = _collect(mg, {**dict(zip(outs, sums)), **wide}, gains, n)
    res.kv_cache = describe(mg.recast, data)
    return res


def _fed(mg: Merged, gains: dict) -> dict:
    """The gain inputs the merged graph has: a wide layer's output is compared outside it."""
    outside = {mg.gain_input(w.tensor) for w in mg.wide}
    return {key: v for key, v in gains.items() if key not in outside}


def _run(sess, outs: list[str], feeds: dict, k: int) -> list:
    try:
        return sess.run(outs, feeds)
    except Exception as e:       # onnxruntime's errors: bad token ids, shapes the graphs reject
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise GraphpassError(f"onnxruntime failed on batch {k} ({msg})") from None


def _collect(mg: Merged, sums: dict[str, float], gains: dict, n: int) -> DebugResult:
    at = {t: k for k, t in enumerate(mg.tensors)}
    layers = []
    for i, p in enumerate(mg.pairs):
        k = at[p.tensor]
        r = LayerError(p.name, p.tensor, p.index, p.quantized, sums[f"gp_dbg_{k}_s"], sums[f"gp_dbg_{k}_e"],
                       gains[f"gp_dbg_{k}_gain"].size > 1, p.module, note=p.note)
        if p.act:
            j = at[p.act]
            r.input_sqnr = _db(sums[f"gp_dbg_{j}_s"], sums[f"gp_dbg_{j}_e"])
        if i in mg.local:
            r.local_signal, r.local_noise = sums[f"gp_dbg_loc{i}_l"], sums[f"gp_dbg_loc{i}_m"]
        if p.quantized and r.rescaled and p.tensor in mg.fit and not r.note:
            r.note = ("output gain fitted on data (no weight read back): a per-channel scale error "
                      "here is not counted")
        layers.append(r)
    return DebugResult(layers, mg.unmatched, n)


def _gain(a: np.ndarray, b: np.ndarray, c: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray | None:
    """Per-channel gain g_j = Σ T_j² / Σ T_j T̂_j (T̂ regressed on T: noise in T̂ that T does not
    explain leaves it unbiased, unlike the fit of T on T̂) on the channels smoothing may rescale
    (`mask`, None: all; 1 elsewhere), or None when the tensor is not rescaled."""
    a, b, c = (v.astype(np.float64) for v in (a, b, c))
    live = (a > 0) & (b > 0) & (c > 0)
    if mask is not None:
        live &= mask
    if not live.any():
        return None
    g = np.where(live, a / np.where(live, c, 1.0), 1.0).astype(np.float32)
    return g if _rescaled(g, mask) else None


def _rescaled(g: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """A real per-channel rescale (smoothing) of the channels in `mask` (None: all), not rounding
    noise around 1."""
    g = g if mask is None or g.size != mask.size else g[mask]
    return bool(np.median(np.abs(np.log(np.maximum(np.abs(g), 1e-30)))) > RESCALED)


def _session(mg: Merged, threads: int):
    """The session over the merged model and one per wide layer alone (debug_wide); the folder
    goes as soon as onnxruntime has mapped them."""
    import onnxruntime as ort

    from graphpass.graph.runtime import session_options

    so = session_options(threads, prepack=False)   # no prepacked copies: weights stay mapped once
    so.enable_cpu_mem_arena = False                # freed activations go back at once
    try:
        return (ort.InferenceSession(str(mg.path), so, providers=["CPUExecutionProvider"]),
                [ort.InferenceSession(str(w.head), so, providers=["CPUExecutionProvider"]) for w in mg.wide])
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise GraphpassError(f"onnxruntime cannot run the two graphs together ({msg})") from None
    finally:
        mg.folder.remove()


def write_json(res: DebugResult, path: str | os.PathLike, by: str = "sqnr") -> None:
    from graphpass.graph.io import write_text

    write_text(path, json.dumps(res.to_json(by), indent=2) + "\n")
