"""Drop the NaN guard exporters put after attention softmax: Where(IsNaN(P), 0, P) -> P.

P = Softmax(S + M) is NaN only on a row whose mask M is -inf everywhere. When the graph takes
no attention-mask input, its mask is built from positions alone (causal: key j <= query i), so
every row keeps its diagonal and the guard never fires: removing it computes the same function,
while the Where + IsNaN pair costs ~13% of a SmolLM2 forward pass on onnxruntime CPU.
Graphs that take an attention mask (padding can empty a row) keep their guards.
"""
from __future__ import annotations

import onnx

from graphpass.graph.consts import Consts
from graphpass.graph.io import consumers, producers


def drop_softmax_nan_guards(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    """Returns (model, guards removed, why guards were kept)."""
    g = model.graph
    prod, cons, c = producers(g), consumers(g), Consts(g)
    inputs, outputs = {i.name for i in g.input} - set(c.inits), {o.name for o in g.output}
    dead, kept = [], ""
    for n in g.node:
        if n.op_type != "Where" or len(n.input) != 3:
            continue
        cond, zero, p = n.input
        isnan, sm = prod.get(cond), prod.get(p)
        if isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != p or n.output[0] in outputs:
            continue
        z = c.get(zero)
        if sm is None or sm.op_type != "Softmax" or z is None or z.size != 1 or z.reshape(-1)[0] != 0:
            continue
        if not _positional_mask(sm, prod, inputs):
            kept = "an attention mask reads a graph input's values (padding can empty a row)"
            continue
        for r in cons.get(n.output[0], []):
            r.input[:] = [p if i == n.output[0] else i for i in r.input]
        dead.append(n)
        if len(cons.get(cond, [])) == 1:
            dead.append(isnan)
    ids = {id(n) for n in dead}
    for k in reversed([k for k, n in enumerate(g.node) if id(n) in ids]):
        del g.node[k]
    return model, sum(n.op_type == "Where" for n in dead), kept


def _positional_mask(softmax: onnx.NodeProto, prod: dict, inputs: set[str]) -> bool:
    """True when the scores' additive mask depends on graph inputs only through their shapes."""
    add = prod.get(softmax.input[0])
    if add is None or add.op_type != "Add":
        return False
    return any(not _reads_values(mask, prod, inputs) for mask in add.input)


def _reads_values(t: str, prod: dict, inputs: set[str]) -> bool:
    """True when `t` reads the values (not only the shapes) of a graph input, or comes from a
    MatMul (the operand holding the scores)."""
    todo, seen = [t], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inputs:
            return True
        n = prod.get(t)
        if n is not None and n.op_type not in ("Shape", "Size"):
            if n.op_type == "MatMul":
                return True
            todo.extend(i for i in n.input if i)
    return False
