"""Sums of very wide layers (an LM head over a 262k vocabulary), reduced row chunk by row chunk.

In the merged debug graph a wide layer Y = X·W [rows, V] makes the reference's Y, the
candidate's Ŷ and their difference tensors of one session: 3 x 512 x 262,144 x 4 B = 1.5 GiB at
one sample of 512 tokens, more than the whole model, whenever onnxruntime keeps them alive
together (one run of 4 x 512 tokens on the 67 MB fixture read 1.78 GiB). For such a layer (V >= WIDE, and no gain to fit on Y)
the merged graph returns X, the candidate's Ŷ and, for the layer-alone sums, X̂ instead; a
session holding the reference layer alone (the node and its constant inputs) computes Y over
row chunks R_c of CHUNK_BYTES of output:
  s = Σ_c Σ Y_c²,           e = Σ_c Σ (Ŷ_c − Y_c)²,             Y_c = X[R_c]·W
  l = Σ_c Σ Y_loc,c²,       m = Σ_c Σ (Ŷ_c − Y_loc,c)²,         Y_loc,c = (g_X·X̂[R_c])·W
the same sums debug_graph forms inside the graph. Ŷ stays whole, as the candidate computes it
(a per-tensor activation quantizer would see other values on a row slice), so a batch holds one
Ŷ plus a few chunks: the reference layer is row-separable (a MatMul / Gemm on X).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

WIDE = 16384               # output channels from which a layer's sums are reduced in chunks
CHUNK_BYTES = 32 << 20     # output bytes per chunk of the reference layer


@dataclass
class Wide:
    """A wide pair whose sums are reduced outside the merged graph."""
    k: int                 # its output tensor's position in Merged.tensors
    i: int                 # its position in Merged.pairs
    tensor: str            # Y (the candidate's is PREFIX + tensor)
    act: str               # X in the reference
    cand_act: str          # X̂ in the merged graph ("" without the layer-alone sums)
    head: Path             # the reference layer alone: input "x" -> output "y"


def head_model(g: onnx.GraphProto, node: onnx.NodeProto, opsets, ir_version: int) -> onnx.ModelProto | None:
    """`node` alone, X renamed "x" and Y "y", with the constant subgraph its other inputs come
    from (a Transpose of a tied table, ...). None when one of them depends on a graph input."""
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    nodes, need, seen = [], [i for i in node.input[1:] if i], set()
    while need:
        t = need.pop()
        if t in seen or t in inits:
            seen.add(t)
            continue
        seen.add(t)
        if t in graph_inputs or t not in producers:
            return None
        p = producers[t]
        nodes.append(p)
        need += [i for i in p.input if i]
    head = onnx.NodeProto()
    head.CopyFrom(node)
    head.input[0], head.output[:] = "x", ["y"]
    order = {id(n): k for k, n in enumerate(g.node)}
    body = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)]) + [head]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    hg = helper.make_graph(body, "graphpass_debug_head", [x], [y], [inits[t] for t in sorted(seen) if t in inits])
    m = helper.make_model(hg, opset_imports=opsets)
    m.ir_version = ir_version
    return m


def wide_sums(w: Wide, head, x: np.ndarray, yq: np.ndarray, xq: np.ndarray | None,
              gx: np.ndarray) -> dict[str, float]:
    """The sums of the module docstring for one batch (keys as Merged.outputs() names them)."""
    xs, q = x.reshape(-1, x.shape[-1]), yq.reshape(-1, yq.shape[-1])
    step = max(1, CHUNK_BYTES // (4 * q.shape[1]))
    out = dict.fromkeys([f"gp_dbg_{w.k}_s", f"gp_dbg_{w.k}_e"] +
                        ([f"gp_dbg_loc{w.i}_l", f"gp_dbg_loc{w.i}_m"] if xq is not None else []), 0.0)
    for lo in range(0, q.shape[0], step):
        qc = q[lo:lo + step]
        tmp = np.empty_like(qc)
        y = head.run(["y"], {"x": np.ascontiguousarray(xs[lo:lo + step])})[0].reshape(qc.shape)
        out[f"gp_dbg_{w.k}_s"] += _ss(y, tmp)
        out[f"gp_dbg_{w.k}_e"] += _ss(np.subtract(qc, y, out=y), tmp)
        if xq is not None:
            xc = xq.reshape(-1, xq.shape[-1])[lo:lo + step] * gx
            y = head.run(["y"], {"x": np.ascontiguousarray(xc, dtype=np.float32)})[0].reshape(qc.shape)
            out[f"gp_dbg_loc{w.i}_l"] += _ss(y, tmp)
            out[f"gp_dbg_loc{w.i}_m"] += _ss(np.subtract(qc, y, out=y), tmp)
    return out


def _ss(v: np.ndarray, tmp: np.ndarray) -> float:
    """Σ v²: squares in float32 (as the graph's ReduceSumSquare), pairwise row sums, rows summed
    in float64 (5e-9 relative on a chunk of 128 x 262,144, against 1e-4 for one float32 dot)."""
    np.square(v, out=tmp)
    return float(tmp.sum(axis=1).sum(dtype=np.float64))
