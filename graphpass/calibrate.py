"""Streaming calibration in onnxruntime: reductions run inside the graph, memory is O(channels).

For every tensor X that feeds a linear layer, the calibration graph computes
  F = Flatten(X, axis=-1)           [rows, C]
  min_j = ReduceMin(F, axes=[0]),   max_j = ReduceMax(F, axes=[0])
and returns only those vectors; the original outputs (and nodes only they need, e.g. the LM
head) are dropped. Batches are merged with np.minimum / np.maximum.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from .data import batches, check_data
from .errors import GraphpassError
from .ir import load_model
from .patterns import analyze
from .runtime import make_session
from .stats import Stats


def calibration_targets(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> channel count, for the input of every linear layer (site or not)."""
    an = analyze(model)
    return {lin.act: int(lin.weight(an.consts).shape[0]) for lin in an.linears}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def add_reductions(model: onnx.ModelProto, targets: list[str]) -> list[str]:
    """Replace the graph outputs by per-channel min/max of each target; returns output names."""
    g, new18 = model.graph, _opset(model) >= 18
    axes = "gp_calib_axes0"
    g.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [0]))
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
    _prune(g)
    return outs


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on (the LM head, say) and initializers nobody reads."""
    need = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    kept = list(reversed(keep))
    del g.node[:]
    g.node.extend(kept)
    used = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(used)


def calibrate(model_path: str | os.PathLike, data: dict[str, np.ndarray], batch_size: int = 1,
              threads: int = 2, progress: bool = True, targets: dict[str, int] | None = None) -> Stats:
    """Per-channel min/max of every linear layer's input over `data`, batch by batch."""
    p = Path(model_path)
    graph_only = load_model(p, load_weights=False)
    check_data(data, graph_only, "data")
    if targets is None:
        targets = calibration_targets(load_model(p))
    if not targets:
        raise GraphpassError(f"{p}: no linear layer with a constant weight; nothing to calibrate")
    names = sorted(targets)
    outs = add_reductions(graph_only, names)
    sess = _session_beside(graph_only, p, threads)
    stats = Stats()
    for b in tqdm(list(batches(data, batch_size)), desc="calibrate", unit="batch", disable=not progress):
        vals = sess.run(outs, b)
        for k, t in enumerate(names):
            stats.update(t, vals[2 * k], vals[2 * k + 1])
        stats.samples += next(iter(b.values())).shape[0]
    stats.require(targets, "calibration")
    return stats


def _session_beside(graph_only: onnx.ModelProto, p: Path, threads: int):
    """A session for a weightless copy of the graph whose external data sits beside `p`."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    if not any(uses_external_data(t) for t in _get_all_tensors(graph_only)):
        return make_session(graph_only, threads)  # weights are inline: nothing to find beside
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.calib.", suffix=".onnx", dir=p.parent)
    os.close(fd)
    try:
        onnx.save_model(graph_only, tmp)
        return make_session(tmp, threads)
    finally:
        Path(tmp).unlink(missing_ok=True)
