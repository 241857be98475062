"""Constant tensors of a gs.Graph: read them lazily, rewrite them without touching other readers.

A constant is a gs.Constant (an initializer) or the output of a Constant node.
`Consts.replace(node, i, value)` gives input i of `node` a new value: the constant is rebound when
`node` is its only reader, else `node` gets a new gs.Constant of its own (copy-on-write), so a
weight shared with another layer is never changed under it.

Memory: a constant still in external data is read on demand and never cached (gs's own
`Constant.values` keeps what it loads); a rewritten weight is a plain numpy array in the graph
until io.save_graph writes it, one tensor at a time.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.graph.gs_io import names, read, set_values
from graphpass.graph.io import unique_name


class Consts:
    def __init__(self, graph: gs.Graph, taken: set[str] | None = None):
        self.graph = graph
        self.graph_outputs = {o.name for o in graph.outputs}
        self._names = names(graph) if taken is None else taken

    @staticmethod
    def producer(t: gs.Tensor | None) -> gs.Node | None:
        return t.inputs[0] if t is not None and not isinstance(t, gs.Constant) and t.inputs else None

    def _const_node(self, t: gs.Tensor | None) -> gs.Node | None:
        p = self.producer(t)
        return p if p is not None and p.op == "Constant" else None

    def is_const(self, t: gs.Tensor | None) -> bool:
        return isinstance(t, gs.Constant) or self._const_node(t) is not None

    def get(self, t: gs.Tensor | None) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            return read(t)
        n = self._const_node(t)
        if n is None:
            return None
        v = n.attrs.get("value")
        if isinstance(v, gs.Constant):
            return read(v)
        for key, val in n.attrs.items():   # value_float, value_ints, ...
            if key.startswith("value"):
                return np.asarray(val.values if isinstance(val, gs.Constant) else val)
        return None

    def shape(self, t: gs.Tensor | None) -> tuple[int, ...] | None:
        """Shape without reading the data (weights may still sit in external data)."""
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        v = self.get(t)
        return None if v is None else v.shape

    def dtype(self, t: gs.Tensor | None) -> np.dtype | None:
        if isinstance(t, gs.Constant):
            try:
                return np.dtype(t.dtype)
            except TypeError:
                return None
        v = self.get(t)
        return None if v is None else v.dtype

    def shared(self, t: gs.Tensor) -> bool:
        return len(t.outputs) > 1 or t.name in self.graph_outputs

    def unique_name(self, base: str) -> str:
        return unique_name(base, self._names)

    def replace(self, node: gs.Node, index: int, value: np.ndarray) -> gs.Constant:
        """Give `node.inputs[index]` the constant `value`; returns the constant it now reads."""
        t = node.inputs[index]
        old = self.dtype(t)
        value = np.ascontiguousarray(value.astype(old if old is not None else value.dtype))
        if isinstance(t, gs.Constant) and not self.shared(t):
            set_values(t, value)
            return t
        new = gs.Constant(self.unique_name(f"{t.name}_gp"), value)
        node.inputs[index] = new
        return new


def attr(node: gs.Node, name: str, default):
    v = node.attrs.get(name, default)
    return default if v is None else v
