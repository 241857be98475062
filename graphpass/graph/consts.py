"""Constant tensors of a graph: read them, and rewrite them without touching other users.

A constant is an initializer or the output of a Constant node. `Consts.replace(node, i, value)`
gives input i of `node` a new value: in place when `node` is the tensor's only reader, else as a
fresh initializer (copy-on-write), so a weight shared with another layer is never changed under it.

Memory: weights left in external data are read on demand and not cached. New large values wait
in an overlay (plain numpy, freed as soon as a later pass consumes them) until `flush()` writes
them into the graph: protobuf arenas never give memory back, so a weight smoothed and then
quantized never passes through the graph in float.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graphpass.graph.io import unique_name

from graphpass.graph.io import _all_inputs

CACHE_BYTES = 1 << 16


class Consts:
    def __init__(self, graph: onnx.GraphProto, base_dir: str | None = None):
        self.graph, self.base_dir = graph, base_dir   # base_dir: read external data lazily
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.readers: dict[str, int] = {}
        for n in graph.node:    # a weight read inside an If / Loop branch counts as shared
            for i in list(n.input) + [i for i in set(_all_inputs(n)[len(n.input):]) if i not in n.input]:
                self.readers[i] = self.readers.get(i, 0) + 1
        self.graph_outputs = {o.name for o in graph.output}
        self.overlay: dict[str, np.ndarray] = {}
        self._cache: dict[str, np.ndarray] = {}
        self._gone: set[str] = set()
        self._names = set(self.inits) | {o for n in graph.node for o in n.output} | \
            {i.name for i in graph.input}

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape without reading the data (weights may still sit in external data)."""
        if name in self.overlay:
            return self.overlay[name].shape
        if name in self.inits:
            return tuple(self.inits[name].dims)
        v = self.get(name)
        return None if v is None else v.shape

    def dtype(self, name: str) -> np.dtype | None:
        if name in self.overlay:
            return self.overlay[name].dtype
        if name in self.inits:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.inits[name].data_type))
        v = self.get(name)
        return None if v is None else v.dtype

    def get(self, name: str) -> np.ndarray | None:
        if name in self.overlay:
            return self.overlay[name]
        if name in self._cache:
            return self._cache[name]
        if name in self._gone:
            raise ValueError(f"tensor '{name}' was released")
        if name in self.inits:
            v = numpy_helper.to_array(self._readable(self.inits[name]))
        elif name in self.const_nodes:
            attr = self.const_nodes[name].attribute[0]
            v = numpy_helper.to_array(attr.t) if attr.name == "value" else \
                np.asarray(onnx.helper.get_attribute_value(attr))
        else:
            return None
        if v.nbytes <= CACHE_BYTES:   # weights are read again when needed, not kept twice
            self._cache[name] = v
        return v

    def _readable(self, t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return t
        if self.base_dir is None:
            raise ValueError(f"tensor '{t.name}' is in external data and no folder was given")
        r = onnx.TensorProto()
        r.CopyFrom(t)
        try:
            onnx.external_data_helper.load_external_data_for_tensor(r, self.base_dir)
        except Exception as e:   # onnx refuses e.g. a data file with several hard links
            from graphpass.errors import GraphpassError

            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise GraphpassError(f"cannot read external data of '{t.name}': {msg}") from None
        r.data_location = onnx.TensorProto.DEFAULT
        del r.external_data[:]
        return r

    def shared(self, name: str) -> bool:
        return self.readers.get(name, 0) > 1 or name in self.graph_outputs

    def unique_name(self, base: str) -> str:
        return unique_name(base, self._names)

    def replace(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> str:
        """Give `node.input[index]` the constant `value`; returns the tensor name it now reads."""
        name = node.input[index]
        old_dtype = self.dtype(name)
        value = np.ascontiguousarray(value.astype(old_dtype if old_dtype is not None else value.dtype))
        if name in self.inits and not self.shared(name):
            self._set(name, value)
            return name
        new = self.unique_name(f"{name}_gp")
        self.graph.initializer.append(onnx.TensorProto(name=new))
        self.inits[new] = self.graph.initializer[-1]
        self._set(new, value)
        self.readers[name] -= 1
        self.readers[new] = 1
        node.input[index] = new
        return new

    def _set(self, name: str, value: np.ndarray) -> None:
        self._cache.pop(name, None)
        if value.nbytes > CACHE_BYTES:
            self.overlay[name] = value
            t = self.inits[name]     # keep dims and type right for readers of the graph
            del t.dims[:]
            t.dims.extend(value.shape)
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        else:
            self.overlay.pop(name, None)
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def release(self, name: str) -> None:
        """Free a weight whose only reader is being replaced (it is pruned from the graph later)."""
        if name in self.inits and self.readers.get(name, 0) == 1 and name not in self.graph_outputs:
            self.overlay.pop(name, None)
            self._cache.pop(name, None)
            self._gone.add(name)

    def flush(self) -> None:
        """Write every pending value into the graph and bring external tensors in (before saving)."""
        for name, t in self.inits.items():
            if name in self._gone:
                continue
            if name in self.overlay:
                t.CopyFrom(numpy_helper.from_array(self.overlay.pop(name), name))
            elif t.data_location == onnx.TensorProto.EXTERNAL and t.external_data:
                t.CopyFrom(numpy_helper.from_array(self.get(name), name))
