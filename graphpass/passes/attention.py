"""Drop the NaN guard exporters put after attention softmax: Where(IsNaN(P), 0, P) -> P.

P = Softmax(S + M) is NaN only on a row whose mask M is -inf everywhere. When the graph takes
no attention-mask input, its mask is built from positions alone (causal: key j <= query i), so
every row keeps its diagonal and the guard never fires: removing it computes the same function,
while the Where + IsNaN pair costs ~13% of a SmolLM2 forward pass on onnxruntime CPU.
Graphs that take an attention mask (padding can empty a row) keep their guards.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import export_into, import_graph


def drop_softmax_nan_guards(model: onnx.ModelProto | gs.Graph) -> tuple[onnx.ModelProto | gs.Graph, int, str]:
    """Returns (model, guards removed, why guards were kept). A gs.Graph is edited in place; a
    ModelProto is imported, edited and written back into the same object."""
    g = model if isinstance(model, gs.Graph) else import_graph(model)
    c = Consts(g)
    inputs = {i.name for i in g.inputs if not isinstance(i, gs.Constant)}
    removed, kept = 0, ""
    for n in list(g.nodes):
        if n.op != "Where" or len(n.inputs) != 3:
            continue
        cond, zero, p = n.inputs
        isnan, sm = c.producer(cond), c.producer(p)
        if isnan is None or isnan.op != "IsNaN" or isnan.inputs[0] is not p or n.outputs[0].name in c.graph_outputs:
            continue
        z = c.get(zero)
        if sm is None or sm.op != "Softmax" or z is None or z.size != 1 or z.reshape(-1)[0] != 0:
            continue
        if not _positional_mask(sm, c, inputs):
            kept = "an attention mask reads a graph input's values (padding can empty a row)"
            continue
        out = n.outputs[0]
        for r in list(out.outputs):
            for k, i in enumerate(r.inputs):
                if i is out:
                    r.inputs[k] = p
        n.outputs.clear()
        n.inputs.clear()
        removed += 1
    if removed:
        g.cleanup()                  # the IsNaN nodes no one reads any more
    if isinstance(model, onnx.ModelProto) and removed:
        export_into(model, g)
    return model, removed, kept


def _positional_mask(softmax: gs.Node, c: Consts, inputs: set[str]) -> bool:
    """True when the scores' additive mask depends on graph inputs only through their shapes."""
    add = c.producer(softmax.inputs[0])
    if add is None or add.op != "Add":
        return False
    return any(not _reads_values(mask, c, inputs) for mask in add.inputs)


def _reads_values(t: gs.Tensor, c: Consts, inputs: set[str]) -> bool:
    """True when `t` reads the values (not only the shapes) of a graph input, or comes from a
    MatMul (the operand holding the scores)."""
    todo, seen = [t], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.name in inputs:
            return True
        n = c.producer(t)
        if n is not None and n.op not in ("Shape", "Size"):
            if n.op == "MatMul":
                return True
            todo.extend(i for i in n.inputs if i.name)
    return False
