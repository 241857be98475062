"""Streaming calibration in onnxruntime: reductions run inside the graph, memory is O(channels).

For every tensor X that feeds a linear layer, the calibration graph computes
  F = Flatten(X, axis=-1)           [rows, C]
  min_j = ReduceMin(F, axes=[0]),   max_j = ReduceMax(F, axes=[0])
and returns only those vectors; the original outputs (and nodes only they need, e.g. the LM
head) are dropped. Batches are merged with np.minimum / np.maximum.

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from graphpass.calibrate.data import batches, check_data
from graphpass.errors import GraphpassError
from graphpass.graph.io import _all_inputs, load_model, opset_version, save_model
from graphpass.match.sites import analyze
from graphpass.graph.runtime import make_session
from graphpass.calibrate.stats import Stats
from graphpass.graph.decode import Cache, PastLayout, advance, past_layout, step_feeds

DECODE_STEPS = 4   # decode steps per calibration window of a with-past graph


def calibration_targets(model: onnx.ModelProto, base_dir: str | None = None) -> dict[str, int]:
    """Tensor -> channel count, for the input of every linear layer (site or not)."""
    an = analyze(model, base_dir)
    return {lin.act: int(lin.shape(an.consts)[0]) for lin in an.linears}


def add_reductions(model: onnx.ModelProto, targets: list[str], row_step: int = 0) -> list[str]:
    """Replace the graph outputs by per-channel min/max of each target; returns output names.

    With row_step > 0 every target also returns its rows o, o + row_step, o + 2·row_step, ...
    (samples of X for the per-site alpha search) as a third output; o is the graph input
    `gp_calib_start`.
    """
    g, new18 = model.graph, opset_version(model) >= 18
    axes = "gp_calib_axes0"
    g.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [0]))
    if row_step:
        for nm, v in (("end", 2**62), ("step", row_step)):
            g.initializer.append(helper.make_tensor(f"gp_calib_{nm}", onnx.TensorProto.INT64, [1], [v]))
        # the first sampled row varies batch by batch (fed at run time), so every position is seen
        g.input.append(helper.make_tensor_value_info("gp_calib_start", onnx.TensorProto.INT64, [1]))
    outs = []
    del g.output[:]
    for k, t in enumerate(targets):
        flat = f"gp_calib_flat_{k}"
        g.node.append(helper.make_node("Flatten", [t], [flat], axis=-1, name=f"gp_calib_Flatten_{k}"))
        for red in ("Min", "Max"):
            o = f"gp_calib_{red.lower()}_{k}"
            ins = [flat, axes] if new18 else [flat]
            kw = {} if new18 else {"axes": [0]}
            g.node.append(helper.make_node(f"Reduce{red}", ins, [o], keepdims=0,
                                           name=f"gp_calib_Reduce{red}_{k}", **kw))
            g.output.append(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
            outs.append(o)
        if row_step:
            o = f"gp_calib_rows_{k}"
            g.node.append(helper.make_node("Slice", [flat, "gp_calib_start", "gp_calib_end", axes, "gp_calib_step"],
                                           [o], name=f"gp_calib_Slice_{k}"))
            g.output.append(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
            outs.append(o)
    _prune(g)
    return outs


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on (the LM head, say) and initializers nobody reads."""
    need = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in _all_inputs(n) if i)   # an If / Loop reads what its branches read
    kept = list(reversed(keep))
    del g.node[:]
    g.node.extend(kept)
    used = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(used)


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


def calibrate(model_path: str | os.PathLike, data, batch_size: int = 1, threads: int = 2,
              progress: bool = True, targets: dict[str, int] | None = None, row_step: int = 0,
              decode_steps: int = DECODE_STEPS) -> Stats:
    """Per-channel min/max of every linear layer's input over `data`, batch by batch.

    `data`: dict of arrays (first axis = samples) or a CalibrationDataReader. With row_step > 0,
    `stats.rows[t]` also holds every row_step-th row of each target (kept in memory, not saved).
    `decode_steps`: for a with-past graph, the K of the module docstring (0: prefill only).
    """
    p = Path(model_path)
    graph_only = load_model(p, load_weights=False)
    if targets is None:
        targets = calibration_targets(graph_only, str(p.parent))
    if not targets:
        raise GraphpassError(f"{p}: no linear layer with a constant weight; nothing to calibrate")
    names = sorted(targets)
    check_model = _inputs_only(graph_only)
    if isinstance(data, dict):
        check_data(data, check_model, "data")   # before any progress bar is drawn
    layout = past_layout(graph_only, p.parent) if decode_steps > 0 else None
    outs = add_reductions(graph_only, names, row_step)
    if layout is not None:
        _keep_present(graph_only.graph, layout)
    with tempfile.TemporaryDirectory(prefix="graphpass-calib-") as tmp:
        src = _spill(graph_only, Path(tmp))
        del graph_only   # inline weights now sit in tmp: their protobuf copy goes back to the OS
        sess = make_session(src, threads, prepack=False, external_dir=str(p.parent.resolve())
                            if isinstance(src, onnx.ModelProto) else None)
    stats, per = Stats(), 3 if row_step else 2
    total = -(-len(next(iter(data.values()))) // batch_size) if isinstance(data, dict) and data else None
    rows: dict[str, list[np.ndarray]] = {t: [] for t in names} if row_step else {}
    rng = np.random.default_rng(0)

    def start(f: dict) -> dict:     # where this run's row samples begin
        if not row_step:
            return {}
        tokens = max(1, f["input_ids"].size if "input_ids" in f else next(iter(f.values())).size)
        return {"gp_calib_start": rng.integers(0, min(row_step, tokens), 1, dtype=np.int64)}

    batches_in = feeds(data, batch_size, check_model)
    for b, nxt in tqdm(with_next_tokens(batches_in, decode_steps if layout else 0), total=total,
                       desc="calibrate", unit="batch", disable=None if progress else True):
        for vals in run_window(sess, outs, b, layout, nxt, start):
            for k, t in enumerate(names):
                stats.update(t, vals[per * k], vals[per * k + 1])
                if row_step:
                    rows[t].append(vals[per * k + 2])
        stats.samples += next(iter(b.values())).shape[0]
    stats.require(targets, "calibration")
    for t in list(rows):               # one tensor at a time: never two copies of all rows
        stats.rows[t] = np.concatenate(rows.pop(t))
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
               following: np.ndarray | None, extra) -> Iterator[list[np.ndarray]]:
    """The values of `outs` for each run over one batch: the batch as given (a prefill), then,
    for a with-past graph and `following` [n <= b, K] tokens, K one-token decode steps of the
    first n rows, each fed the present.* of the run before (`extra(feeds)`: feeds the
    calibration graph adds)."""
    if layout is None or following is None:
        yield sess.run(outs, {**b, **extra(b)})
        return
    n, f = following.shape[0], b
    vals = sess.run(outs + layout.present_names, {**f, **extra(f)})
    yield vals[:len(outs)]
    for t in range(following.shape[1]):
        cache = advance(layout, f, dict(zip(layout.present_names, vals[len(outs):])))
        cache = Cache(cache.mask[:n], {k: v[:n] for k, v in cache.past.items()})
        f = step_feeds(layout, cache, following[:, t:t + 1])
        vals = sess.run(outs + layout.present_names, {**f, **extra(f)})
        yield vals[:len(outs)]


def _keep_present(g: onnx.GraphProto, layout: PastLayout) -> None:
    """Put the present.* outputs back on the calibration graph (decode steps feed them back)."""
    made = {o for n in g.node for o in n.output}
    lost = [n for n in layout.present_names if n not in made]
    if lost:
        raise GraphpassError(f"calibration graph lost the cache output '{lost[0]}'; "
                             f"calibrate with decode steps 0")
    have = {o.name for o in g.output}
    g.output.extend(helper.make_tensor_value_info(p.present, helper.np_dtype_to_tensor_dtype(p.dtype),
                                                  None) for p in layout.past if p.present not in have)


def _inputs_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding just the real graph inputs (for data checks), no weights."""
    inits = {t.name for t in model.graph.initializer}
    m = onnx.ModelProto()
    m.graph.input.extend(i for i in model.graph.input if i.name not in inits)
    return m


def _spill(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto | Path:
    """The calibration graph as onnxruntime should load it. Weights in external data stay beside
    the model (the proto, small, is returned). Inline weights are written to `folder` as external
    data (the path is returned): onnxruntime then maps them rather than parse a second copy of a
    serialized model, and peak memory stays near the model's size instead of several times it."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        return model
    return save_model(model, folder / "calibration.onnx", external=True, release=True)
