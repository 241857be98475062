"""Linear layers: MatMul / Gemm nodes whose weight is a constant, seen as Y = X·W with W [in, out].

Handled: MatMul(X, W); MatMul(X, Transpose(E)) (a tied LM head); Gemm with transB in {0, 1}
(transB=1 stores W^T); a bias as Gemm's C or as Add(MatMul(X, W), b). Anything else that holds
a constant weight is listed with the reason it is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from graphpass.graph.consts import Consts


@dataclass
class Linear:
    node: onnx.NodeProto
    act: str                       # tensor X
    in_axis: int                   # axis of the stored weight that runs over input channels
    via: onnx.NodeProto | None     # Transpose between the stored constant and the node
    out: str                       # Y, after the bias Add when there is one
    bias_at: tuple[onnx.NodeProto, int] | None  # (node, input index) holding the bias

    @property
    def name(self) -> str:
        return label(self.node)

    def _holder(self) -> tuple[onnx.NodeProto, int]:
        return (self.via, 0) if self.via is not None else (self.node, 1)

    def stored(self, c: Consts) -> np.ndarray:
        n, i = self._holder()
        return c.get(n.input[i])

    def shape(self, c: Consts) -> tuple[int, int]:
        """(in, out) without reading the weight."""
        n, i = self._holder()
        a, b = c.shape(n.input[i])
        return (b, a) if (self.in_axis == 1) != (self.via is not None) else (a, b)

    def weight(self, c: Consts) -> np.ndarray:
        """W as [in, out]."""
        w = self.stored(c)
        return w.T if (self.in_axis == 1) != (self.via is not None) else w

    def set_weight(self, c: Consts, w: np.ndarray) -> None:
        """Store a new [in, out] weight in the layout the graph reads (copy-on-write)."""
        n, i = self._holder()
        stored = w.T if (self.in_axis == 1) != (self.via is not None) else w
        c.replace(n, i, np.ascontiguousarray(stored))

    def shared_weight(self, c: Consts) -> bool:
        n, i = self._holder()
        return c.shared(n.input[i]) or (self.via is not None and c.shared(self.via.output[0]))


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_source(name: str, c: Consts, prod: dict) -> tuple[onnx.NodeProto | None, str | None]:
    """(Transpose node or None, reason or None) for a weight input tensor."""
    if c.is_const(name):
        return None, None
    p = prod.get(name)
    if p is not None and p.op_type == "Transpose" and c.is_const(p.input[0]):
        perm = list(_attr(p, "perm", [1, 0]))
        if perm == [1, 0] and len(c.shape(p.input[0])) == 2:
            return p, None
    return None, "weight is not a constant"


def _bias_add(out: str, width: int, c: Consts, cons: dict) -> tuple[onnx.NodeProto, int] | None:
    users = cons.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in c.graph_outputs:
        return None
    add = users[0]
    j = 1 if add.input[0] == out else 0
    b = c.get(add.input[j])
    if b is None or b.size != width or b.shape[-1] != width:
        return None
    return add, j


def _subgraph_linears(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes in the If / Loop / Scan bodies of `node`, nested ones included."""
    out = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                if n.op_type in ("MatMul", "Gemm"):
                    out.append(n)
                out += _subgraph_linears(n)
    return out


def find_linears(graph: onnx.GraphProto, c: Consts, prod: dict, cons: dict
                 ) -> tuple[list[Linear], list[tuple[str, str]]]:
    """Every MatMul/Gemm with a constant weight: as a Linear, or (name, reason) when left alone."""
    found, skipped = [], []
    for n in graph.node:
        for sub in _subgraph_linears(n):
            skipped.append((label(sub), f"inside a branch of {n.op_type} '{n.name or n.output[0]}' "
                                        "(left in float: control flow is not rewritten)"))
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        via, why = _weight_source(n.input[1], c, prod)
        if why:
            if c.is_const(n.input[0]):
                skipped.append((label(n), "the constant is the left operand"))
            continue  # activation x activation (attention scores): not a linear layer
        lin = Linear(n, n.input[0], 0, via, n.output[0], None)
        h, i = lin._holder()
        shape, dtype = c.shape(h.input[i]), c.dtype(h.input[i])
        if len(shape) != 2:
            skipped.append((label(n), f"weight has rank {len(shape)}, expected 2"))
            continue
        if dtype != np.float32:
            skipped.append((label(n), f"weight is {dtype}, expected float32"))
            continue
        if n.op_type == "Gemm":
            if _attr(n, "transA", 0):
                skipped.append((label(n), "Gemm with transA=1"))
                continue
            lin.in_axis = 1 if _attr(n, "transB", 0) else 0
            if len(n.input) > 2 and n.input[2]:
                if not c.is_const(n.input[2]):
                    skipped.append((label(n), "Gemm bias C is not a constant"))
                    continue
                lin.bias_at = (n, 2)
        else:
            add = _bias_add(n.output[0], lin.shape(c)[1], c, cons)
            if add is not None:
                lin.bias_at, lin.out = add, add[0].output[0]
        found.append(lin)
    return found, skipped
