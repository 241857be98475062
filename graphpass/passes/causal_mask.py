"""Proofs read from the graph for the causal-attention split (passes/causal.py).

causal_mask(M): M = Where(keep, 0, fill) with keep an And-tree holding LessOrEqual(j, i), or
Where(masked, fill, 0) with masked an Or-tree holding Greater(j, i); fill <= -1e30; i and j one
Range(0, n, 1) unsqueezed onto axes -2 (query) and -1 (key). Later keys are then masked for
every row, whatever the other conjuncts. With a finite fill a row masked everywhere would turn
uniform over all keys (not over the chunk's), so then every other conjunct must be provably
all-true (And) or all-false (Or), e.g. a mask of ones expanded to the input's shape.

Dims.length(...): the query length, value length and both mask dims are one symbolic
(or static, > 1) dim, from the exporter's value_info or onnxruntime's symbolic shape inference
(no merging of unknown dims): broadcasting a length-1 side would change the output shape.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphpass.graph.consts import Consts

BIG = -1e30
_KEEP = {"LessOrEqual": (-1, -2), "GreaterOrEqual": (-2, -1)}   # keeps key j <= query i
_MASK = {"Greater": (-1, -2), "Less": (-2, -1)}                  # masks key j > query i
_DATA = {"Cast", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Tile",
         "Flatten", "Slice", "Gather", "GatherND", "GatherElements"}   # outputs pick input[0] values


def causal_mask(mask: str, prod: dict, c: Consts) -> bool:
    w = prod.get(mask)
    if w is None or w.op_type != "Where":
        return False
    a, b = c.get(w.input[1]), c.get(w.input[2])
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
    todo = [w.input[0]]
    while todo:
        t = todo.pop()
        n = prod.get(t)
        if n is not None and n.op_type == tree:
            todo.extend(n.input)
        elif not found and n is not None and n.op_type in leaves and _compares(n, leaves, prod, c):
            found = True
        else:
            rest.append(t)
    return found and (np.isneginf(fill) or all(uniform(t, other, prod, c) for t in rest))


def _compares(n: onnx.NodeProto, leaves: dict, prod: dict, c: Consts) -> bool:
    ax0, ax1 = leaves[n.op_type]
    r = _index(n.input[0], prod, c, ax0)
    return r is not None and r == _index(n.input[1], prod, c, ax1)


def uniform(t: str, value: int, prod: dict, c: Consts, depth: int = 0) -> bool:
    """True when every element of `t` provably equals `value` (0 or 1; any Cast keeps both)."""
    v = c.get(t)
    if v is not None:
        return bool(np.all(v == value))
    n = prod.get(t)
    if n is None or depth > 64:
        return False
    if n.op_type == "ConstantOfShape":
        attr = next((a.t for a in n.attribute if a.name == "value"), None)
        fill = onnx.numpy_helper.to_array(attr) if attr is not None else np.zeros(1, np.float32)
        return bool(np.all(fill == value))
    if n.op_type in _DATA:
        return uniform(n.input[0], value, prod, c, depth + 1)
    if n.op_type in ("And", "Or", "Concat", "Min", "Max"):
        return all(uniform(i, value, prod, c, depth + 1) for i in n.input if i)
    return False


def _index(t: str, prod: dict, c: Consts, want: int):
    """The Range output when `t` is Range(0, n, 1) unsqueezed so that it runs along axis `want`."""
    axes_after = []
    n = prod.get(t)
    while n is not None and n.op_type == "Unsqueeze":
        ax = c.get(n.input[1]) if len(n.input) > 1 else None
        if ax is None:
            return None
        axes_after.append(ax.reshape(-1).astype(int).tolist())
        n = prod.get(n.input[0])
    if n is None or n.op_type != "Range":
        return None
    start, delta = c.get(n.input[0]), c.get(n.input[2])
    if start is None or delta is None or start.reshape(-1)[0] != 0 or delta.reshape(-1)[0] != 1:
        return None
    rank, pos = 1, 0                       # where the range runs, counted from the front
    for axes in reversed(axes_after):
        rank += len(axes)
        for a in sorted(x % rank for x in axes):
            if a <= pos:
                pos += 1
    return n.output[0] if pos - rank == want else None


class Dims:
    """Tensor dims from value_info; onnxruntime's symbolic shape inference fills in the rest once."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.inferred = model, False
        self.dims = _read(model.graph)

    def get(self, t: str) -> list | None:
        d = self.dims.get(t)
        if (d is None or None in d[-2:]) and not self.inferred:
            self.inferred = True
            for name, dims in _infer(self.model).items():
                old = self.dims.get(name)
                if old is None or sum(x is None for x in dims) < sum(x is None for x in old):
                    self.dims[name] = dims
            d = self.dims.get(t)
        return d

    def length(self, q: str, v: str, mask: str):
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
            out[vi.name] = [_dim(d) for d in t.shape.dim]
    return out


def _dim(d) -> str | int | None:
    """A named or static dim; onnx's placeholders for unknown dims (unk__N) prove nothing."""
    if d.HasField("dim_param"):
        return None if d.dim_param.startswith("unk__") or not d.dim_param else d.dim_param
    return d.dim_value if d.HasField("dim_value") else None


def _infer(model: onnx.ModelProto) -> dict[str, list]:
    """Symbolic shapes without merging unknown dims; weights become shaped inputs (not read)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
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
