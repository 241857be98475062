"""onnx-graphsurgeon, plus the few things it lacks: lazy external weights with their folder,
non-caching reads, copy-on-write rebinding, unique names, and a memory-bounded export.

import_graph(model, base_dir)  -> gs.Graph of a model loaded without weights: every initializer
                                  stays a LazyValues (no bytes read) that knows its folder
read(t)                        -> numpy value of a constant, WITHOUT caching it in the graph
                                  (gs's own `Constant.values` keeps what it loads)
set_values(c, v)               -> c's value := v (a new array: Graph.copy() shares arrays)
export_graph(g)                -> (ModelProto, pending): large constants exported as stubs whose
                                  bytes the caller writes one tensor at a time (io.save_graph)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphpass.errors import GraphpassError

STUB_LOCATION = "graphpass-pending"
STUB_BYTES = 1024          # constants at least this large are written by the caller, not gs


class ExternalValues(LazyValues):
    """LazyValues of a tensor in external data, read from `base_dir` (gs's loader passes none)."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str | None):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        t = self.tensor
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(t)
        if self.base_dir is None:
            raise ValueError(f"tensor '{t.name}' is in external data and no folder was given")
        r = onnx.TensorProto()
        r.CopyFrom(t)
        try:
            onnx.external_data_helper.load_external_data_for_tensor(r, self.base_dir)
        except Exception as e:   # onnx refuses e.g. a data file with several hard links
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise GraphpassError(f"cannot read external data of '{t.name}': {msg}") from None
        r.data_location = onnx.TensorProto.DEFAULT
        del r.external_data[:]
        return onnx.numpy_helper.to_array(r)


def import_graph(model: onnx.ModelProto, base_dir: str | None = None) -> gs.Graph:
    """gs.import_onnx, with every external constant readable from `base_dir`."""
    g = gs.import_onnx(model)
    for node, proto in zip(g.nodes, model.graph.node):   # gs keeps the order, not the metadata
        if proto.metadata_props:
            node.graphpass_meta = {p.key: p.value for p in proto.metadata_props}
    for c in constants(g):
        v = c._values
        if isinstance(v, LazyValues) and not isinstance(v, ExternalValues) and \
                isinstance(v.tensor, onnx.TensorProto):
            c._values = ExternalValues(v.tensor, base_dir)
    g.graphpass_opsets = {o.domain: o.version for o in model.opset_import}
    g.graphpass_local = {t.name for sub in _proto_subgraphs(model.graph) for t in sub.initializer}
    return g


def _proto_subgraphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = []
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out += [sub, *_proto_subgraphs(sub)]
    return out


def proto_graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph (If / Loop bodies), recursively."""
    return [model.graph, *_proto_subgraphs(model.graph)]


def initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers of the main graph and of every subgraph."""
    return [t for g in proto_graphs(model) for t in g.initializer]


def _hoist(model: onnx.ModelProto, local: set[str]) -> None:
    """gs exports an outer-scope weight read only inside a branch as that branch's initializer
    (and twice when both scopes read it): put it back in the main graph, once."""
    main = {t.name for t in model.graph.initializer}
    for sub in _proto_subgraphs(model.graph):
        moved = [k for k, t in enumerate(sub.initializer) if t.name not in local]
        for k in reversed(moved):
            t = sub.initializer[k]
            if t.name not in main:
                model.graph.initializer.add().CopyFrom(t)
                main.add(t.name)
            del sub.initializer[k]


def constants(g: gs.Graph) -> list[gs.Constant]:
    """Every Constant of g and its subgraphs (initializers and Constant-node values)."""
    out, seen = [], set()
    for graph in [g, *_subgraphs(g)]:
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        for n in graph.nodes:
            v = n.attrs.get("value") if n.op == "Constant" else None
            if isinstance(v, gs.Constant) and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def _subgraphs(g: gs.Graph) -> list[gs.Graph]:
    out = []
    for sub in g.subgraphs(recursive=True):
        out.append(sub)
    return out


def metadata(node) -> dict[str, str]:
    """A node's metadata_props (exporters keep module paths there), for a gs.Node or a NodeProto."""
    if isinstance(node, onnx.NodeProto):
        return {p.key: p.value for p in node.metadata_props}
    return getattr(node, "graphpass_meta", {})


def read(t: gs.Constant) -> np.ndarray:
    """The constant's value; a lazy one is loaded for the caller only, not kept in the graph."""
    v = t._values
    return v.load() if isinstance(v, LazyValues) else v


def set_values(c: gs.Constant, value: np.ndarray) -> None:
    """Rebind (never edit in place: Graph.copy() shares arrays); the value is now inline."""
    c.values = np.ascontiguousarray(value)
    c.data_location = None


def release(c: gs.Constant) -> None:
    """Drop the value of a constant that left the graph (its type and shape stay)."""
    c._values = LazyValues(_stub(c))


def nbytes(c: gs.Constant) -> int:
    v = c._values
    return int(v.nbytes)


def is_external(c: gs.Constant) -> bool:
    v = c._values
    return isinstance(v, LazyValues) and isinstance(v.tensor, onnx.TensorProto) and \
        v.tensor.data_location == onnx.TensorProto.EXTERNAL


def names(g: gs.Graph) -> set[str]:
    """Every tensor and node name in g and its subgraphs (a table for unique_name)."""
    out = set()
    for graph in [g, *_subgraphs(g)]:
        out.update(graph.tensors().keys())
        out.update(n.name for n in graph.nodes)
        out.update(t.name for t in (*graph.inputs, *graph.outputs))
    out.discard("")
    return out


def opset_version(g: gs.Graph, default: int | None = 13) -> int | None:
    """The default-domain opset of the imported model."""
    ops = getattr(g, "graphpass_opsets", None) or {"": g.opset}
    return next((v for d, v in ops.items() if d in ("", "ai.onnx")), default)


def add_opset(g: gs.Graph, domain: str, version: int = 1) -> None:
    ops = getattr(g, "graphpass_opsets", None)
    if ops is None:
        g.graphpass_opsets = ops = {"": g.opset}
    ops.setdefault(domain, version)


def is_stub(t: onnx.TensorProto) -> bool:
    """t is a stub export_graph left for the caller to fill (not a tensor exported with its bytes)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and \
        any(e.key == "location" and e.value == STUB_LOCATION for e in t.external_data)


def _stub(c: gs.Constant) -> onnx.TensorProto:
    """A TensorProto with c's name, type and shape whose bytes are not there yet."""
    v = c._values
    if isinstance(v, LazyValues) and isinstance(v.tensor, onnx.TensorProto):
        dims, dtype = list(v.tensor.dims), v.tensor.data_type
    else:
        dims, dtype = list(v.shape), onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
    t = onnx.TensorProto(name=c.name, data_type=dtype, dims=dims)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=STUB_LOCATION)
    return t


def export_graph(g: gs.Graph, min_bytes: int | None = None) -> tuple[onnx.ModelProto, dict[str, gs.Constant]]:
    """gs.export_onnx with every initializer of STUB_BYTES or more (or in external data) left as
    a stub: pending[name] holds its Constant, whose bytes the caller writes (one tensor at a
    time) with fill(). So no weight is held twice, as it would be by export_onnx's copies."""
    pending, saved, least = {}, {}, STUB_BYTES if min_bytes is None else min_bytes
    for c in (t for graph in [g, *_subgraphs(g)] for t in graph.tensors().values()):
        if isinstance(c, gs.Constant) and c.name not in pending and (is_external(c) or nbytes(c) >= least):
            pending[c.name], saved[c.name] = c, c._values
            c._values = LazyValues(_stub(c))
    try:
        model = to_model(g)
    finally:
        for name, c in pending.items():
            c._values = saved[name]
    return model, pending


def to_model(g: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx with the model's own opset imports (custom domains included)."""
    ops = dict(getattr(g, "graphpass_opsets", None) or {})
    for n in g.nodes:
        if n.domain and n.domain not in ops:
            ops[n.domain] = 1
    kw = {}
    if ops:
        kw["opset_imports"] = [onnx.helper.make_opsetid(d, v) for d, v in ops.items()]
    m = gs.export_onnx(g, do_type_check=False, **kw)
    _hoist(m, getattr(g, "graphpass_local", set()))
    for node, proto in zip(g.nodes, m.graph.node):
        for k, v in metadata(node).items():
            proto.metadata_props.add(key=k, value=v)
    if g.ir_version is None:
        m.ir_version = onnx.IR_VERSION
    return m


def export_into(model: onnx.ModelProto, g: gs.Graph) -> None:
    """Write g back into `model` (graph and opset imports; the model's metadata stays)."""
    m = to_model(g)
    model.graph.CopyFrom(m.graph)
    del model.opset_import[:]
    model.opset_import.extend(m.opset_import)


def tensor_bytes(c: gs.Constant) -> bytes:
    """The raw little-endian bytes of a constant, as TensorProto.raw_data holds them, with one
    copy: a weight still in external data is read as bytes, not through numpy and a TensorProto."""
    v = c._values
    if isinstance(v, LazyValues) and isinstance(v.tensor, onnx.TensorProto):
        t = v.tensor
        if t.data_location == onnx.TensorProto.EXTERNAL and getattr(v, "base_dir", None):
            info = {e.key: e.value for e in t.external_data}
            with open(Path(v.base_dir) / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                return f.read(int(info["length"])) if "length" in info else f.read()
        if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data"):
            return t.raw_data
        v = v.load()
    a = np.asarray(v)
    if a.dtype.kind in "biuf" and a.dtype.byteorder in "=<|":
        return np.ascontiguousarray(a).tobytes()
    return onnx.numpy_helper.from_array(a, c.name).raw_data


def fill(t: onnx.TensorProto, c: gs.Constant, release: bool) -> None:
    """Write c's bytes inline into the stub t; release: c drops its array (the graph is done)."""
    data = tensor_bytes(c)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = data
    if release:
        c._values = LazyValues(t)
