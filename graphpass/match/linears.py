"""Linear layers: MatMul / Gemm nodes whose weight is a constant, seen as Y = X·W with W [in, out].

Handled: MatMul(X, W); MatMul(X, Transpose(E)) (a tied LM head); Gemm with transB in {0, 1}
(transB=1 stores W^T); a bias as Gemm's C or as Add(MatMul(X, W), b). Anything else that holds
a constant weight is listed with the reason it is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.graph.consts import Consts, attr


@dataclass(eq=False)
class Linear:
    node: gs.Node
    in_axis: int                   # axis of the stored weight that runs over input channels
    via: gs.Node | None            # Transpose between the stored constant and the node
    out: str                       # Y, after the bias Add when there is one
    bias_at: tuple[gs.Node, int] | None  # (node, input index) holding the bias

    @property
    def name(self) -> str:
        return label(self.node)

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def act(self) -> str:
        """Name of X (it moves when smoothing duplicates the norm in front)."""
        return self.node.inputs[0].name

    def _holder(self) -> tuple[gs.Node, int]:
        return (self.via, 0) if self.via is not None else (self.node, 1)

    def weight_tensor(self) -> gs.Tensor:
        n, i = self._holder()
        return n.inputs[i]

    def _flip(self) -> bool:
        return (self.in_axis == 1) != (self.via is not None)

    def stored(self, c: Consts) -> np.ndarray:
        return c.get(self.weight_tensor())

    def shape(self, c: Consts) -> tuple[int, int]:
        """(in, out) without reading the weight."""
        a, b = c.shape(self.weight_tensor())
        return (b, a) if self._flip() else (a, b)

    def weight(self, c: Consts) -> np.ndarray:
        """W as [in, out]."""
        w = self.stored(c)
        return w.T if self._flip() else w

    def set_weight(self, c: Consts, w: np.ndarray) -> None:
        """Store a new [in, out] weight in the layout the graph reads (copy-on-write)."""
        n, i = self._holder()
        c.replace(n, i, np.ascontiguousarray(w.T if self._flip() else w))

    def shared_weight(self, c: Consts) -> bool:
        return c.shared(self.weight_tensor()) or (self.via is not None and c.shared(self.via.outputs[0]))


def label(node: gs.Node) -> str:
    return node.name or f"{node.op}({node.outputs[0].name})"


def _weight_source(t: gs.Tensor, c: Consts) -> tuple[gs.Node | None, str | None]:
    """(Transpose node or None, reason or None) for a weight input tensor."""
    if c.is_const(t):
        return None, None
    p = c.producer(t)
    if p is not None and p.op == "Transpose" and c.is_const(p.inputs[0]):
        perm = list(attr(p, "perm", [1, 0]))
        if perm == [1, 0] and len(c.shape(p.inputs[0])) == 2:
            return p, None
    return None, "weight is not a constant"


def _bias_add(out: gs.Tensor, width: int, c: Consts) -> tuple[gs.Node, int] | None:
    users = out.outputs
    if len(users) != 1 or users[0].op != "Add" or out.name in c.graph_outputs:
        return None
    add = users[0]
    j = 1 if add.inputs[0] is out else 0
    b = c.get(add.inputs[j])
    if b is None or b.size != width or b.shape[-1] != width:
        return None
    return add, j


def _subgraph_linears(node: gs.Node) -> list[gs.Node]:
    """MatMul / Gemm nodes in the If / Loop / Scan bodies of `node`, nested ones included."""
    out = []
    for sub in node.subgraphs(recursive=True):
        out += [n for n in sub.nodes if n.op in ("MatMul", "Gemm")]
    return out


def find_linears(graph: gs.Graph, c: Consts) -> tuple[list[Linear], list[tuple[str, str]]]:
    """Every MatMul/Gemm with a constant weight: as a Linear, or (name, reason) when left alone."""
    found, skipped = [], []
    for n in graph.nodes:
        for sub in _subgraph_linears(n):
            skipped.append((label(sub), f"inside a branch of {n.op} '{n.name or n.outputs[0].name}' "
                                        "(left in float: control flow is not rewritten)"))
        if n.op not in ("MatMul", "Gemm"):
            continue
        via, why = _weight_source(n.inputs[1], c)
        if why:
            if c.is_const(n.inputs[0]):
                skipped.append((label(n), "the constant is the left operand"))
            continue  # activation x activation (attention scores): not a linear layer
        lin = Linear(n, 0, via, n.outputs[0].name, None)
        why = _reject(lin, n, c)
        if why:
            skipped.append((label(n), why))
            continue
        if n.op != "Gemm":
            add = _bias_add(n.outputs[0], lin.shape(c)[1], c)
            if add is not None:
                lin.bias_at, lin.out = add, add[0].outputs[0].name
        found.append(lin)
    return found, skipped


def _reject(lin: Linear, n: gs.Node, c: Consts) -> str:
    """Why this MatMul/Gemm cannot be a Linear ('' when it can); sets Gemm's layout and bias."""
    w = lin.weight_tensor()
    shape, dtype = c.shape(w), c.dtype(w)
    if len(shape) != 2:
        return f"weight has rank {len(shape)}, expected 2"
    if dtype != np.float32:
        return f"weight is {dtype}, expected float32"
    if n.op == "Gemm":
        if attr(n, "transA", 0):
            return "Gemm with transA=1"
        lin.in_axis = 1 if attr(n, "transB", 0) else 0
        if len(n.inputs) > 2 and n.inputs[2].name:
            if not c.is_const(n.inputs[2]):
                return "Gemm bias C is not a constant"
            lin.bias_at = (n, 2)
    return ""
