from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import export_graph

BIG = -1e30
_KEEP = {"LessOrEqual": (-1, -2), "GreaterOrEqual": (-2, -1)}   # keeps key j <= query i
_MASK = {"Greater": (-1, -2), "Less": (-2, -1)}                  # masks key j > query i
_DATA = {"Cast", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Tile",
         "Flatten", "Slice", "Gather", "GatherND", "GatherElements"}   # outputs pick input[0] values


def causal_mask(mask: gs.Tensor, c: Consts) -> bool:
    w = c.producer(mask)
    if w is None or w.op != "Where":
        return False
    a, b = c.get(w.inputs[1]), c.get(w.inputs[2])
    if a is None or b is None or a.size != 1 or b.size != 1:
        return False
    a, b = float(a.reshape(-1)[0]), float(b.reshape(-1)[0])
    if a == 0 and b <= BIG:
        fill, tree, leaves, other = b, "And", _KEEP, 1
    elif b == 0 and a <= BIG:
        fill, tree, leaves, other = a, "Or", _MASK, 0
    else:
        return False
    found, rest = False, []
    todo = [w.inputs[0]]
    while todo:
        t = todo.pop()
        n = c.producer(t)
        if n is not None and n.op == tree:
            todo.extend(n.inputs)
        elif not found and n is not None and n.op in leaves and _compares(n, leaves, c):
            found = True
        else:
            rest.append(t)
    return found and (np.isneginf(fill) or all(uniform(t, other, c) for t in rest))


def _compares(n: gs.Node, leaves: dict, c: Consts) -> bool:
    ax0, ax1 = leaves[n.op]
    r = _index(n.inputs[0], c, ax0)
    return r is not None and r is _index(n.inputs[1], c, ax1)


def uniform(t: gs.Tensor, value: int, c: Consts, depth: int = 0) -> bool:
    """True when every element of `t` provably equals `value` (0 or 1; any Cast keeps both)."""
    v = c.get(t)
    if v is not None:
        return bool(np.all(v == value))
    n = c.producer(t)
    if n is None or depth > 64:
        return False
    if n.op == "ConstantOfShape":
        attr = n.attrs.get("value")
        fill = c.get(attr) if isinstance(attr, gs.Constant) else np.zeros(1, np.float32)
        return bool(np.all(fill == value))
    if n.op in _DATA:
        return uniform(n.inputs[0], value, c, depth + 1)
    if n.op in ("And", "Or", "Concat", "Min", "Max"):
        return all(uniform(i, value, c, depth + 1) for i in n.inputs if i.name)
    return False


def _index(t: gs.Tensor, c: Consts, want: int):
    """The Range output when `t` is Range(0, n, 1) unsqueezed so that it runs along axis `want`."""
    axes_after = []
    n = c.producer(t)
    while n is not None and n.op == "Unsqueeze":
        ax = c.get(n.inputs[1]) if len(n.inputs) > 1 else None
        if ax is None:
            return None
        axes_after.append(ax.reshape(-1).astype(int).tolist())
        n = c.producer(n.inputs[0])
    if n is None or n.op != "Range":
        return None
    start, delta = c.get(n.inputs[0]), c.get(n.inputs[2])
    if start is None or delta is None or start.reshape(-1)[0] != 0 or delta.reshape(-1)[0] != 1:
        return None
    rank, pos = 1, 0                       # where the range runs, counted from the front
    for axes in reversed(axes_after):
        rank += len(axes)
        for a in sorted(x % rank for x in axes):
            if a <= pos:
                pos += 1
    return n.outputs[0] if pos - rank == want else None


class Dims:
    """Tensor dims from the graph (value_info); onnxruntime's symbolic shape inference fills in
    the rest once."""

    def __init__(self, graph: gs.Graph):
        self.graph, self.inferred = graph, False
        self.dims: dict[str, list] = {}

    def get(self, t: gs.Tensor) -> list | None:
        d = self.dims.get(t.name)
        if d is None and t.shape is not None:
            d = self.dims[t.name] = [_dim(x) for x in t.shape]
        if (d is None or None in d[-2:]) and not self.inferred:
            self.inferred = True
            for name, dims in _infer(export_graph(self.graph, 4097)[0]).items():
                old = self.dims.get(name)
                if old is None or sum(x is None for x in dims) < sum(x is None for x in old):
                    self.dims[name] = dims
            d = self.dims.get(t.name)
        return d

    def length(self, q: gs.Tensor, v: gs.Tensor, mask: gs.Tensor):
        """The one length of queries, values and both mask dims, or None when not provably one.
        Keys need no proof: P·V makes the scores' key dim equal the values' length n, so the
        key length is n or 1, and a single broadcast key slices to itself in every chunk."""
        dq, dv, dm = (self.get(t) for t in (q, v, mask))
        if not all(d is not None and len(d) >= 2 for d in (dq, dv, dm)):
            return None
        n = dm[-1]
        ok = n not in (None, "", 0, 1) and dm[-2] == dq[-2] == dv[-2] == n
        return n if ok else None


def _read(g: onnx.GraphProto) -> dict[str, list]:
    out = {}
    for vi in (*g.value_info, *g.input, *g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [_dim(d.dim_param if d.HasField("dim_param") else
                                 d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
    return out


def _dim(d) -> str | int | None:
    """A named or static dim; onnx's placeholders for unknown dims (unk__N) prove nothing."""
    if isinstance(d, str):
        return None if d.startswith("unk__") or not d else d
    return None if d is None else int(d)


def _infer(model: onnx.ModelProto) -> dict[str, list]:
    """Symbolic shapes without merging unknown dims; weights become shaped inputs (not read)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return {}
    m = model           # a fresh export: ours to change
    g = m.graph
    keep = []
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 4096:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    g.ClearField("initializer")
    g.initializer.extend(keep)
    try:
        return _read(SymbolicShapeInference.infer_shapes(m, auto_merge=False).graph)
    except Exception:   # noqa: BLE001 - any failure only means: no proof, no rewrite
        return {}
