"""Attention over a [b, kv, T, d] cache without the repeat-kv copy (grouped query attention).

The decomposed graph repeats each kv head over its rep = h / kv query heads before the attention
MatMuls (Unsqueeze(axis 2) + Expand + Reshape: query head j reads kv head j // rep), a copy of
rep x the cache at every step. Grouping the query heads instead reads the cache once:
    Q_g    = Reshape(Q, [0, kv, -1, d])                 [b, kv, rep·s, d]   (rows (r, t) of group g)
    scores = Reshape(Q_g · c · diag(s_k) · K̂ᵀ, [b, h, s, -1])
    P_g    = Reshape(P, [0, kv, -1, 0])                  [b, kv, rep·s, T]
    out    = Reshape((P_g · V̂) · c · diag(s_v), [b, h, s, -1])
with K̂, V̂ = Cast(cache) [b, kv, T, d] (MatMul broadcasts over b and kv), s the int8 scales
(kv_concat.py) and c the scalar Mul / Div the chain applied to the keys or values. Row (g, r·s + t)
of Q_g is query head g·rep + r at position t, the head that read kv head g: the same products,
summed in the same order. A Shape read of the repeated cache (the exporter's mask reads its
length) is moved to the cache itself when it only takes axes 0, 2 or 3 (equal in both), so the
copy leaves the graph.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, const

SAME_AXES = {0, 2, 3, -1, -2, -4}        # axes where [b, kv, T, d] and [b, h, T, d] agree


def check_repeat(chain: list[gs.Node]) -> None:
    """The chain's repeat-kv is Unsqueeze(axis 2) + Expand: NoMatch with the reason otherwise."""
    unsq = [n for n in chain if n.op == "Unsqueeze"]
    for n in unsq:
        axes = const(n.inputs[1]) if len(n.inputs) > 1 else np.array(n.attrs.get("axes", []))
        if axes is None or [int(a) for a in np.ravel(axes)] != [2]:
            raise NoMatch(f"Unsqueeze '{n.name}' is not on axis 2 (repeat kv)")
    if len(unsq) > 1:
        raise NoMatch("more than one Unsqueeze between the cache and its MatMul")


def group_read(g: gs.Graph, mm: gs.Node, key: bool, cache: gs.Variable, s4: np.ndarray, factor: float,
               name: str) -> None:
    """MatMul `mm` (Q·Kᵀ when `key`, else P·V) rewritten to read `cache` [b, kv, T, d] directly
    (module docstring); its output tensor keeps its name and consumers."""
    kv, d = s4.shape[1], s4.shape[3]
    x, out = mm.inputs[0], mm.outputs[0]
    mm.inputs.clear()
    mm.outputs.clear()                                   # the old MatMul leaves with cleanup()
    head = g.layer(op="Shape", inputs=[x], outputs=[gs.Variable(f"{name}/head", np.int64)],
                   attrs={"start": 0, "end": 3})[0]
    back = g.layer(op="Concat", inputs=[head, gs.Constant(f"{name}/rest", np.array([-1], np.int64))],
                   outputs=[gs.Variable(f"{name}/back", np.int64)], attrs={"axis": 0})[0]
    groups = np.array([0, kv, -1, d if key else 0], np.int64)
    xg = g.layer(op="Reshape", inputs=[x, gs.Constant(f"{name}/groups", groups)],
                 outputs=[gs.Variable(f"{name}/grouped", np.float32)])[0]
    scale = gs.Constant(f"{name}/scale", (s4 * np.float32(factor)).astype(np.float32))
    if key:
        xg = g.layer(op="Mul", inputs=[xg, scale], outputs=[gs.Variable(f"{name}/scaled", np.float32)])[0]
        kt = g.layer(op="Transpose", inputs=[cache], outputs=[gs.Variable(f"{name}/kt", np.float32)],
                     attrs={"perm": [0, 1, 3, 2]})[0]
        y = g.layer(op="MatMul", inputs=[xg, kt], outputs=[gs.Variable(f"{name}/scores", np.float32)])[0]
    else:
        y = g.layer(op="MatMul", inputs=[xg, cache], outputs=[gs.Variable(f"{name}/unscaled", np.float32)])[0]
        y = g.layer(op="Mul", inputs=[y, scale], outputs=[gs.Variable(f"{name}/scaled", np.float32)])[0]
    g.nodes.append(gs.Node("Reshape", f"{name}/Reshape", inputs=[y, back], outputs=[out]))


def move_shape_reads(chain: list[gs.Node], present: gs.Variable) -> list[str]:
    """Shape reads of the repeated cache (the chain's outputs after its Expand) moved to `present`
    where only axes 0, 2, 3 are taken; returns the reads left (which keep the copy alive)."""
    left, after = [], False
    for n in chain:
        after = after or n.op == "Expand"
        if not after:
            continue
        rank4 = n.op == "Reshape"
        for s in [r for r in n.outputs[0].outputs if r.op == "Shape"]:
            takes = [c for c in s.outputs[0].outputs]
            ok = rank4 and not s.attrs and takes and all(
                c.op == "Gather" and int(c.attrs.get("axis", 0)) == 0 and (i := const(c.inputs[1])) is not None
                and i.size == 1 and int(i.reshape(-1)[0]) in SAME_AXES for c in takes)
            if ok:
                s.inputs[0] = present
            else:
                left.append(f"Shape '{s.name}' of '{n.outputs[0].name}'")
    return left
