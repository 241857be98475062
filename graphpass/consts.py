"""Constant tensors of a graph: read them, and rewrite them without touching other users.

A constant is an initializer or the output of a Constant node. `Consts.replace(node, i, value)`
gives input i of `node` a new value: in place when `node` is the tensor's only reader, else as a
fresh initializer (copy-on-write), so a weight shared with another layer is never changed under it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


CACHE_BYTES = 1 << 16


class Consts:
    def __init__(self, graph: onnx.GraphProto, base_dir: str | None = None):
        self.graph, self.base_dir = graph, base_dir   # base_dir: read external data lazily
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.readers: dict[str, int] = {}
        for n in graph.node:
            for i in n.input:
                self.readers[i] = self.readers.get(i, 0) + 1
        self.graph_outputs = {o.name for o in graph.output}
        self._cache: dict[str, np.ndarray] = {}
        self._names = {n for n in self.inits} | {o for n in graph.node for o in n.output} | \
                      {i.name for i in graph.input}

    def release(self, name: str) -> None:
        """Free a float weight's bytes now that its only reader is being replaced."""
        if name in self.inits and self.readers.get(name, 0) == 1 and name not in self.graph_outputs:
            t = self.inits[name]
            if t.data_location != onnx.TensorProto.EXTERNAL:
                t.ClearField("raw_data")
                t.ClearField("float_data")
                t.data_location = onnx.TensorProto.EXTERNAL   # marks it as gone for get()
            self._cache.pop(name, None)

    def load_external(self) -> None:
        """Bring every initializer still in external data into the graph (before saving)."""
        for name, t in self.inits.items():
            if t.data_location == onnx.TensorProto.EXTERNAL and t.external_data:
                t.CopyFrom(numpy_helper.from_array(self.get(name), name))

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape without reading the data (weights may still sit in external data)."""
        if name in self.inits:
            return tuple(self.inits[name].dims)
        v = self.get(name)
        return None if v is None else v.shape

    def dtype(self, name: str) -> np.dtype | None:
        if name in self.inits:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.inits[name].data_type))
        v = self.get(name)
        return None if v is None else v.dtype

    def get(self, name: str) -> np.ndarray | None:
        if name in self._cache:
            return self._cache[name]
        if name in self.inits:
            t = self.inits[name]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                if self.base_dir is None:
                    raise ValueError(f"tensor '{name}' is in external data and no folder was given")
                t = onnx.TensorProto()
                t.CopyFrom(self.inits[name])
                onnx.external_data_helper.load_external_data_for_tensor(t, self.base_dir)
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            v = numpy_helper.to_array(t)
        elif name in self.const_nodes:
            attr = self.const_nodes[name].attribute[0]
            if attr.name != "value":
                v = np.asarray(onnx.helper.get_attribute_value(attr))
            else:
                v = numpy_helper.to_array(attr.t)
        else:
            return None
        if v.nbytes <= CACHE_BYTES:   # weights are read again from the graph, not kept twice
            self._cache[name] = v
        return v

    def shared(self, name: str) -> bool:
        return self.readers.get(name, 0) > 1 or name in self.graph_outputs

    def unique_name(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def replace(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> str:
        """Give `node.input[index]` the constant `value`; returns the tensor name it now reads."""
        name = node.input[index]
        old = self.get(name)
        value = value.astype(old.dtype if old is not None else value.dtype)
        if name in self.inits and not self.shared(name):
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
            self._cache.pop(name, None)
            return name
        new = self.unique_name(f"{name}_gp")
        t = numpy_helper.from_array(value, new)
        self.graph.initializer.append(t)
        self.inits[new] = self.graph.initializer[-1]
        self.readers[name] -= 1
        self.readers[new] = 1
        node.input[index] = new
        return new
