"""Streaming calibration in onnxruntime: reductions run inside the graph, memory is O(channels).

For every tensor X that feeds a linear layer, the calibration graph computes
  F = Flatten(X, axis=-1)           [rows, C]
  min_j = ReduceMin(F, axes=[0]),   max_j = ReduceMax(F, axes=[0]),
  Σ|F|_j = ReduceSum(Abs(F), axes=[0]),   rows = Shape(F)   (mean|X_j| for AWQ)
and returns only those vectors; the original outputs (and nodes only they need, e.g. the LM
head) are dropped. Batches are merged with np.minimum / np.maximum. Softmax NaN guards that
cannot fire (passes/attention.py) are left out of the calibration graph: same values, less work.

With-past graphs (graph/decode.py) also keep their present.* outputs, and each window x[0:S]
(past P, usually 0) runs as the generation loop will: a prefill of all of x, then K decode steps
of one token each against the cache the previous run returned, fed the text that follows the
window (the next window's first K tokens: `graphpass data` cuts consecutive windows), so the
ranges also cover positions P+S .. P+S+K-1, past the longest prefill. The last window, which
nothing follows, gets no decode step (K = decode_steps, at most the next window's length).
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.progress import bar
from graphpass.search.pool import ordered_map

from graphpass.calibrate.data import batches, check_data
from graphpass.calibrate.gram import Grams
from graphpass.calibrate.kv_stat import update_cache_absmax
from graphpass.calibrate.rows import RowSpill
from graphpass.calibrate.stats import Stats
from graphpass.errors import GraphpassError
from graphpass.graph.decode import Cache, PastLayout, advance, past_layout, step_feeds
from graphpass.graph.gs_io import export_into, import_graph, is_external, opset_version, to_model
from graphpass.graph.io import externalized, load_model, save_graph
from graphpass.graph.runtime import make_session
from graphpass.match.sites import analyze
from graphpass.passes.attention import drop_softmax_nan_guards

F32 = np.float32

DECODE_STEPS = 4   # decode steps per calibration window of a with-past graph
WINDOWS = 2        # calibration batches in flight on one session (at most `threads`)


def calibration_targets(model: onnx.ModelProto | gs.Graph, base_dir: str | None = None) -> dict[str, int]:
    """Tensor -> channel count, for the input of every linear layer (site or not)."""
    an = analyze(model, base_dir)
    return {lin.act: int(lin.shape(an.consts)[0]) for lin in an.linears}


def add_reductions(model: onnx.ModelProto | gs.Graph, targets: list[str], row_step: int = 0,
                   keep: tuple[str, ...] | list[str] = (), gram_step: int = 0) -> list[str]:
    """Replace the graph outputs by per-channel min/max of each target; returns output names.

    With row_step > 0 every target also returns its rows o, o + row_step, o + 2·row_step, ...
    (samples of X for the per-site alpha search) as a further output; o is the graph input
    `gp_calib_start`. With gram_step > 0, one more: the rows S = F[0::gram_step] (GPTQ's
    Hessian, calibrate/gram.py). Nodes no new output needs (the LM head, say) go with cleanup(); the graph
    outputs named in `keep` (a with-past graph's present.*, fed back by decode steps) stay. A gs.Graph
    is edited in place; a ModelProto is imported, edited and written back into the same object.
    """
    g = model if isinstance(model, gs.Graph) else import_graph(model)
    tensors, new18 = g.tensors(), opset_version(g) >= 18
    axes = gs.Constant("gp_calib_axes0", np.array([0], np.int64))
    zero, end, step, gstep = (gs.Constant(f"gp_calib_{k}", np.array([v], np.int64)) for k, v in
                              (("zero", 0), ("end", 2**62), ("step", row_step), ("gram_step", gram_step)))
    if row_step:
        # the first sampled row varies batch by batch (fed at run time), so every position is seen
        start = gs.Variable("gp_calib_start", np.int64, [1])
        g.inputs.append(start)
    outs, after = [], {}
    for k, t in enumerate(targets):
        flat = gs.Variable(f"gp_calib_flat_{k}")
        absf = gs.Variable(f"gp_calib_abs_{k}")
        nodes = [gs.Node("Flatten", f"gp_calib_Flatten_{k}", {"axis": -1}, [tensors[t]], [flat]),
                 gs.Node("Abs", f"gp_calib_Abs_{k}", {}, [flat], [absf])]
        for red, src in (("Min", flat), ("Max", flat), ("Sum", absf)):
            o = gs.Variable(f"gp_calib_{red.lower()}_{k}", F32)
            new = new18 or red == "Sum"        # ReduceSum takes axes as an input from opset 13
            ins, kw = ([src, axes], {}) if new else ([src], {"axes": [0]})
            nodes.append(gs.Node(f"Reduce{red}", f"gp_calib_Reduce{red}_{k}", {"keepdims": 0, **kw}, ins, [o]))
            outs.append(o)
        o = gs.Variable(f"gp_calib_shape_{k}", np.int64)
        nodes.append(gs.Node("Shape", f"gp_calib_Shape_{k}", {}, [flat], [o]))
        outs.append(o)
        if row_step:
            o = gs.Variable(f"gp_calib_rows_{k}", F32)
            nodes.append(gs.Node("Slice", f"gp_calib_Slice_{k}", {}, [flat, start, end, axes, step], [o]))
            outs.append(o)
        if gram_step:      # beside the other reductions, so the input is freed where it is made
            o = gs.Variable(f"gp_calib_gram_{k}", F32)
            nodes.append(gs.Node("Slice", f"gp_calib_GramSlice_{k}", {}, [flat, zero, end, axes, gstep], [o]))
            outs.append(o)
        after.setdefault(id(tensors[t].inputs[0]) if tensors[t].inputs else None, []).extend(nodes)
    g.nodes = _placed(g.nodes, after)
    kept = [o for o in g.outputs if o.name in set(keep)]
    if len(kept) != len(keep):
        lost = sorted(set(keep) - {o.name for o in kept})[0]
        raise GraphpassError(f"the graph has no output '{lost}' for its cache; calibrate with decode steps 0")
    g.outputs = outs + kept
    g.cleanup()
    if isinstance(model, onnx.ModelProto):
        export_into(model, g)
    return [o.name for o in outs]


def _placed(nodes: list, after: dict) -> list:
    """`nodes` with each list in `after` right behind the node it is keyed by (its id; None: in front).

    A session in node order (runtime.session_options(in_order=True)) then reduces each linear
    input as soon as it exists and frees it. onnxruntime's default order, or the reductions
    appended at the end, ran them after the whole forward pass with every input alive till then
    (SmolLM2 with a KV cache, 121 inputs at 512 tokens: ~200 MB more per run)."""
    out = list(after.get(None, []))
    for n in nodes:
        out.append(n)
        out.extend(after.get(id(n), []))
    return out


def feeds(data, batch_size: int, model: onnx.ModelProto) -> Iterator[dict[str, np.ndarray]]:
    """Batches from a dict of arrays, an onnxruntime CalibrationDataReader, or any iterable of dicts."""
    if isinstance(data, dict):
        check_data(data, model, "data")
        yield from batches(data, batch_size)
        return
    it = iter(data.get_next, None) if hasattr(data, "get_next") else iter(data)
    n = 0
    for b in it:
        check_data(b, model, f"calibration batch {n}")
        n += 1
        yield b
    if n == 0:
        raise GraphpassError("the calibration data reader gave no batch")


def run_threads(threads: int, windows: int) -> int:
    """Intra-op threads of the calibration session when `windows` batches run on it at once."""
    return max(1, threads // max(1, windows))


def calibrate(model_path: str | os.PathLike, data, batch_size: int = 1, threads: int = 2,
              progress: bool = True, targets: dict[str, int] | None = None, row_step: int = 0,
              decode_steps: int = DECODE_STEPS, cache: dict[str, np.ndarray] | None = None,
              gram_step: int = 0, windows: int | None = None,
              rewrite: Callable[[gs.Graph], object] | None = None) -> Stats:
    """See _calibrate; a model with inline weights is read through an external-data copy.
    gram_step > 0: stats.gram gives X^T·X of every gram_step-th row (calibrate/gram.py).
    windows: batches run at once (default min(threads, WINDOWS)); the stats do not depend on it.
    rewrite: applied in place to the graph that is run, before its reductions; it must keep every
    linear input (e.g. the exact decode fusions: the same inputs, fewer nodes to run)."""
    with externalized(model_path) as p:
        return _calibrate(p, data, batch_size, threads, progress, targets, row_step, decode_steps,
                          Path(model_path).parent, cache, gram_step,
                          min(threads, WINDOWS) if windows is None else windows, rewrite)


def _calibrate(model_path: Path, data, batch_size: int, threads: int, progress: bool,
               targets: dict[str, int] | None, row_step: int, decode_steps: int, folder: Path,
               cache: dict[str, np.ndarray] | None = None, gram_step: int = 0, windows: int = 1,
               rewrite: Callable[[gs.Graph], object] | None = None) -> Stats:
    """Per-channel min/max of every linear layer's input over `data`, batch by batch.

    `data`: dict of arrays (first axis = samples) or a CalibrationDataReader. With row_step > 0,
    `stats.rows[t]` also holds every row_step-th row of each target (kept in memory, not saved).
    `decode_steps`: for a with-past graph, the K of the module docstring (0: prefill only).
    `cache`: a dict to fill, in the same runs, with the KV-cache statistic of a with-past graph
    (calibrate/kv_stat.py: what calibrate/kv.cache_absmax returns), saving a pass over the data.
    `windows`: batches (each a prefill and its decode steps) run at once on one session, as
    onnxruntime allows; a graph of many small nodes (a decode step) keeps one core busy per run.
    Their random row offsets are drawn and their results merged in batch order, so the stats are
    those of one batch at a time, to the bit.
    """
    p = Path(model_path)
    graph_only = load_model(p, load_weights=False)
    check_model = _inputs_only(graph_only)
    with_cache = decode_steps > 0 or cache is not None
    layout = past_layout(graph_only, folder) if with_cache else None   # genai_config.json
    g = import_graph(graph_only, str(p.parent.resolve()))
    del graph_only
    if targets is None:
        targets = calibration_targets(g)
    if not targets:
        raise GraphpassError(f"{p}: no linear layer with a constant weight; nothing to calibrate")
    names = sorted(targets)
    if rewrite is not None:
        rewrite(g)
        lost = sorted(set(names) - set(g.tensors()))
        if lost:
            raise GraphpassError(f"calibration: the rewritten graph no longer has the linear input '{lost[0]}'")
    if isinstance(data, dict):
        check_data(data, check_model, "data")   # before any progress bar is drawn
    drop_softmax_nan_guards(g)   # exact where it drops one (positional masks): ~13% of a SmolLM2 forward
    outs = add_reductions(g, names, row_step, keep=layout.present_names if layout is not None else (),
                          gram_step=gram_step)
    with tempfile.TemporaryDirectory(prefix="graphpass-calib-") as tmp:
        src = _spill(g, Path(tmp))
        del g   # inline weights now sit in tmp: their protobuf copy goes back to the OS
        # the windows share the cores: each run gets threads // windows of them, not a pool of all
        # (SmolLM2, 2 cores, 2 windows, interleaved A/Bs near idle: 1 thread per run 27.7-28.8 s
        # against 34.7-35.3 with 2, then 32.3-35.7 against 36.6-38.2 (CPU 63-70 s against 72-76);
        # one A/B with GPTQ's rows read within this VM's noise); the stats are the same to the bit
        sess = make_session(src, run_threads(threads, windows), prepack=False, in_order=True,
                            external_dir=str(p.parent.resolve()) if isinstance(src, onnx.ModelProto) else None)
    stats, per = Stats(kv_absmax=cache), 4 + bool(row_step) + bool(gram_step)
    if gram_step:
        stats.gram = Grams()           # S^T·S per input, computed from spilled rows when GPTQ reads it
    total = -(-len(next(iter(data.values()))) // batch_size) if isinstance(data, dict) and data else None
    rng = np.random.default_rng(0)

    def start(tokens: int) -> dict:     # where a run's row samples begin
        if not row_step:
            return {}
        return {"gp_calib_start": rng.integers(0, min(row_step, max(1, tokens)), 1, dtype=np.int64)}

    def prepare(pair):     # in order, in this thread: the random draws of the window's runs
        b, nxt = pair
        steps = nxt.shape[1] if layout is not None and nxt is not None else 0
        ids = b["input_ids"] if "input_ids" in b else next(iter(b.values()))
        return b, nxt, [start(ids.size)] + [start(nxt.shape[0]) for _ in range(steps)]

    def work(b, nxt, firsts):     # one window's runs, on a worker thread (onnxruntime frees the GIL)
        it = iter(firsts)
        return list(run_window(sess, outs, b, layout, nxt, lambda f: next(it), on_cache))

    pairs = with_next_tokens(feeds(data, batch_size, check_model), decode_steps if layout else 0)
    on_cache = None if cache is None or layout is None else _locked(partial(update_cache_absmax, cache, layout))
    with RowSpill() as rows:           # sampled rows wait on disk while the session holds memory
        for (b, _), runs in bar(ordered_map(prepare, work, pairs, windows), "calibrate", "batch", total,
                                enabled=progress):
            for vals in runs:
                for k, t in enumerate(names):
                    stats.update(t, vals[per * k], vals[per * k + 1])
                    stats.add_abs(t, vals[per * k + 2], int(vals[per * k + 3][0]))
                    if row_step:
                        rows.add(t, vals[per * k + 4])
                    if gram_step:
                        stats.gram.add(t, vals[per * k + per - 1])
            stats.samples += next(iter(b.values())).shape[0]
        del sess, vals, runs                # weights and activations go before the rows come back
        stats.require(targets, "calibration")
        for t in rows.names():
            stats.rows[t] = rows.take(t)
    return stats


def with_next_tokens(batches_in, k: int) -> Iterator[tuple[dict, np.ndarray | None]]:
    """(batch, the k tokens that follow each of its windows, or None): row r is followed by row
    r+1's first k tokens, the batch's last row by the next batch's first row; the very last
    window by nothing, so the array may have one row fewer than the batch."""
    prev = None
    for b in batches_in:
        if prev is not None:
            yield prev, _following(prev, b, k)
        prev = b
    if prev is not None:
        yield prev, _following(prev, None, k)


def _following(b: dict, nb: dict | None, k: int) -> np.ndarray | None:
    ids = b.get("input_ids")
    if k <= 0 or ids is None or ids.ndim != 2:
        return None
    rows = [ids[1:]] + ([nb["input_ids"][:1]] if nb is not None and "input_ids" in nb else [])
    nxt = np.concatenate(rows, 0)[:, :k]
    return nxt if nxt.size else None


def run_window(sess, outs: list[str], b: dict[str, np.ndarray], layout: PastLayout | None,
               following: np.ndarray | None, extra, on_cache=None) -> Iterator[list[np.ndarray]]:
    """The values of `outs` for each run over one batch: the batch as given (a prefill), then,
    for a with-past graph and `following` [n <= b, K] tokens, K one-token decode steps of the
    first n rows, each fed the present.* of the run before (`extra(feeds)`: feeds the
    calibration graph adds). `on_cache(present by name)` sees every run's cache."""
    if layout is None or (following is None and on_cache is None):
        yield sess.run(outs, {**b, **extra(b)})
        return
    n, f = (0, b) if following is None else (following.shape[0], b)
    vals = sess.run(outs + layout.present_names, {**f, **extra(f)})
    if on_cache is not None:
        on_cache(dict(zip(layout.present_names, vals[len(outs):])))
    yield vals[:len(outs)]
    for t in range(0 if following is None else following.shape[1]):
        cache = advance(layout, f, dict(zip(layout.present_names, vals[len(outs):])))
        cache = Cache(cache.mask[:n], {k: v[:n] for k, v in cache.past.items()})
        f = step_feeds(layout, cache, following[:, t:t + 1])
        vals = sess.run(outs + layout.present_names, {**f, **extra(f)})
        if on_cache is not None:
            on_cache(dict(zip(layout.present_names, vals[len(outs):])))
        yield vals[:len(outs)]


def _locked(fn):
    """fn(*args) under a lock: the windows' runs report from two threads."""
    lock = threading.Lock()

    def call(*args):
        with lock:
            return fn(*args)
    return call


def _inputs_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding just the real graph inputs (for data checks), no weights."""
    inits = {t.name for t in model.graph.initializer}
    m = onnx.ModelProto()
    m.graph.input.extend(i for i in model.graph.input if i.name not in inits)
    return m


def _spill(g: gs.Graph, folder: Path) -> onnx.ModelProto | Path:
    """The calibration graph as onnxruntime should load it. Weights in external data stay beside
    the model (the exported proto, small, is returned). Inline weights are written to `folder` as
    external data, one at a time (the path is returned): onnxruntime then maps them rather than
    parse a second copy of a serialized model, and peak memory stays near the model's size."""
    consts = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
    if any(is_external(c) for c in consts):
        return to_model(g)
    return save_graph(g, folder / "calibration.onnx", external=True)
