"""An int8 KV cache in a decomposed attention (the optimum-onnx with-past form).

The float graph keeps its cache as present = Concat(past, K_new, axis=2) [b, kv, T, d] and reads
it through repeat-kv reshapes into MatMul(Q, Kᵀ) and MatMul(P, V). With s [1, kv, 1, d] the
calibrated per-(head, channel) scale (calibrate/kv.py):
    K8      = QuantizeLinear(K_new · (1/s), 1, 0)          int8, only the new tokens
    present = Concat(past8, K8, axis=2)                     int8 graph I/O
    K̂       = Cast(present, float)                          the integers, as floats
Folded (default), the scale never touches the [b, kv, T, d] cache:
    scores  = (Q · diag(s_q)) · K̂ᵀ        s_q: s repeated over the query heads of each kv head
    out     = (P · V̂) · diag(s_v)
since Q·Kᵀ = Q·(K̂·diag(s))ᵀ = (Q·diag(s))·K̂ᵀ and P·(V̂·diag(s)) = (P·V̂)·diag(s). Query head j
reads kv head j // rep (repeat-kv is Unsqueeze + Expand + Reshape), so the per-head scale is
applied as Reshape(Q, [0, kv, -1, d]) · s, reshaped back: no head count needed. Where the chain
is a plain repeat-kv (Unsqueeze on axis 2, Expand), the grouped query also reads the cache
directly and the repeat-kv copy of the cache leaves the graph (kv_grouped.py). Where the path from
the cache to its MatMul is not such a chain, K̂ · s is used instead (dequantize, then float), and
the report says why.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.graph.decode import is_key
from graphpass.passes.decode_match import NoMatch, const, scalar
from graphpass.passes.kv_grouped import check_repeat, group_read, move_shape_reads

CHAIN = ("Unsqueeze", "Expand", "Reshape", "Identity")   # move elements, keep the channel axis


def _concat(past: gs.Variable, outputs: set) -> gs.Node:
    readers = [n for n in past.outputs if n.op != "Shape"]      # a Shape reads int8 alike
    if len(readers) != 1 or readers[0].op != "Concat":
        raise NoMatch(f"'{past.name}' is read by {[n.op for n in readers]}, expected one Concat")
    cat = readers[0]
    if int(cat.attrs.get("axis", 0)) not in (2, -2) or len(cat.inputs) != 2 or cat.inputs[0] is not past:
        raise NoMatch(f"'{past.name}' is not Concat(past, new, axis=2)")
    if cat.outputs[0].name not in outputs:
        raise NoMatch(f"Concat of '{past.name}' is not a graph output (present)")
    return cat


def _attention_matmul(t: gs.Variable, key: bool) -> tuple[gs.Node, list[gs.Node], float]:
    """The MatMul reading the cache `t` as its second input through a repeat-kv chain (and for the
    key one Transpose of the last two axes, and scalar Mul/Div): (MatMul, the chain's nodes, the
    product c of its scalar factors); NoMatch with the reason else."""
    transposes, chain, factor = 0, [], 1.0
    while True:
        data = [n for n in t.outputs if n.op != "Shape"]
        if len(data) != 1:
            raise NoMatch(f"'{t.name}' feeds {[n.op for n in data]}, expected one chain to a MatMul")
        n = data[0]
        if n.op == "MatMul":
            if n.inputs[1] is not t or transposes != (1 if key else 0):
                raise NoMatch(f"'{t.name}' reaches MatMul '{n.name}' but not as its {'Kᵀ' if key else 'V'}")
            return n, chain, factor
        if n.op == "Transpose":
            perm = list(n.attrs.get("perm", []))
            if perm != [0, 1, 3, 2]:
                raise NoMatch(f"Transpose '{n.name}' has perm {perm}, expected [0, 1, 3, 2]")
            transposes += 1
        elif n.op in ("Mul", "Div"):
            c = scalar(n.inputs[1]) if n.inputs[0] is t else None
            if c is None:
                raise NoMatch(f"{n.op} '{n.name}' is not by a scalar constant")
            factor *= c if n.op == "Mul" else 1.0 / c
        elif n.op == "Reshape":
            shape, last = const(n.inputs[1]), (n.inputs[0].shape or [None])[-1]
            if shape is not None and isinstance(last, (int, np.integer)) and \
                    int(shape.reshape(-1)[-1]) not in (-1, 0, int(last)):
                raise NoMatch(f"Reshape '{n.name}' changes the channel axis")
        elif n.op not in CHAIN:
            raise NoMatch(f"'{t.name}' feeds {n.op} '{n.name}', not a repeat-kv chain to a MatMul")
        chain.append(n)
        t = n.outputs[0]


def _per_kv_head(g: gs.Graph, x: gs.Variable, s: np.ndarray, name: str) -> gs.Variable:
    """x [b, kv·rep, n, d] times s [1, kv, 1, d] on head j // rep: Reshape(x, [0, kv, -1, d]) · s,
    reshaped back to Shape(x)."""
    kv, d = s.shape[1], s.shape[3]
    shp = g.layer(op="Shape", inputs=[x], outputs=[gs.Variable(f"{name}/shape", np.int64)])[0]
    grouped = g.layer(op="Reshape", inputs=[x, gs.Constant(f"{name}/groups", np.array([0, kv, -1, d], np.int64))],
                      outputs=[gs.Variable(f"{name}/grouped", np.float32)])[0]
    scaled = g.layer(op="Mul", inputs=[grouped, gs.Constant(f"{name}/scale", s)],
                     outputs=[gs.Variable(f"{name}/scaled", np.float32)])[0]
    return g.layer(op="Reshape", inputs=[scaled, shp], outputs=[gs.Variable(f"{name}/out", np.float32)])[0]


def _quantize_new(g: gs.Graph, cat: gs.Node, s: np.ndarray, name: str) -> None:
    """Concat(past, new) -> Concat(past8, QuantizeLinear(new · (1/s), 1, 0)), int8 I/O."""
    scaled = g.layer(op="Mul", inputs=[cat.inputs[1], gs.Constant(f"{name}/inv_scale", (1.0 / s).astype(np.float32))],
                     outputs=[gs.Variable(f"{name}/scaled_new", np.float32)])[0]
    q = g.layer(op="QuantizeLinear", inputs=[scaled, gs.Constant(f"{name}/one", np.array(1.0, np.float32)),
                                             gs.Constant(f"{name}/zero", np.array(0, np.int8))],
                outputs=[gs.Variable(f"{name}/new_int8", np.int8)])[0]
    cat.inputs[1] = q
    cat.inputs[0].dtype = np.int8
    cat.outputs[0].dtype = np.int8


def _fold(g, mm, key, dq, s4, factor, chain, present, name, pname, why) -> bool:
    """The scales into the query / output: grouped over the kv heads (kv_grouped.py) where the
    chain is a plain repeat-kv, else on the repeated tensors (module docstring)."""
    try:
        if (getattr(g, "opset", None) or 0) < 15:
            raise NoMatch(f"opset {g.opset} < 15 (Shape with start / end)")
        check_repeat(chain)
    except NoMatch as e:
        why.append(f"'{pname}': read through the repeat-kv copy ({e})")
    else:
        group_read(g, mm, key, dq, s4, factor, f"{name}/grouped")
        why.extend(f"'{pname}': repeat-kv copy kept ({r} takes its head axis)" for r in move_shape_reads(chain, present))
        return True
    if key:
        mm.inputs[0] = _per_kv_head(g, mm.inputs[0], s4, f"{name}/query")
    else:
        out = mm.outputs[0]
        raw = gs.Variable(f"{name}/unscaled", np.float32)
        mm.outputs[0] = raw
        scaled = _per_kv_head(g, raw, s4, f"{name}/out")
        scaled.inputs[0].outputs[0] = out          # the last Reshape writes the old name
    return False


def quantize_concat_cache(g: gs.Graph, scales: dict[str, np.ndarray],
                          fold: bool = True) -> tuple[int, int, int, list[str]]:
    """Every Concat(past, new) -> present of `scales` (past name -> s [kv, d]) to int8 (module
    docstring). Returns (caches rewritten, of them with the scale folded, of those read without
    the repeat-kv copy, reasons of the rest)."""
    inputs = {t.name: t for t in g.inputs}
    outputs = {t.name for t in g.outputs}
    done, folded, grouped, why = 0, 0, 0, []
    for pname, s in scales.items():
        past = inputs.get(pname)
        if past is None:
            why.append(f"'{pname}': not a graph input")
            continue
        try:
            cat = _concat(past, outputs)
        except NoMatch as e:
            why.append(str(e))
            continue
        s4 = np.asarray(s, np.float32).reshape(1, s.shape[0], 1, s.shape[1])
        name, present = f"{pname}/kv8", cat.outputs[0]
        key = is_key(pname)
        try:
            mm, chain, factor = _attention_matmul(present, key) if fold else (None, [], 1.0)
        except NoMatch as e:
            mm, chain, factor = None, [], 1.0
            why.append(f"'{pname}': scale not folded ({e})")
        _quantize_new(g, cat, s4, name)
        readers = [n for n in present.outputs if n is not cat]
        dq = g.layer(op="Cast", inputs=[present], outputs=[gs.Variable(f"{name}/float", np.float32)],
                     attrs={"to": onnx.TensorProto.FLOAT})[0]
        if mm is None:
            dq = g.layer(op="Mul", inputs=[dq, gs.Constant(f"{name}/scale", s4)],
                         outputs=[gs.Variable(f"{name}/dequant", np.float32)])[0]
        for n in readers:
            for i, t in enumerate(n.inputs):
                if t is present and n.op != "Shape":
                    n.inputs[i] = dq
        if mm is not None:
            grouped += _fold(g, mm, key, dq, s4, factor, chain, present, name, pname, why)
            folded += 1
        done += 1
    return done, folded, grouped, why
