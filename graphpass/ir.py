"""Model I/O and graph bookkeeping shared by every command.

load_model(path)            -> ModelProto with external data resolved, or a one-line GraphpassError
save_model(model, path)     -> atomic write (temp name + rename); external data past 1 GB
model_size(path)            -> bytes on disk, external data files included
input_specs(model)          -> [(name, numpy dtype, rank)] of the real graph inputs
producers / consumers       -> tensor name -> node(s)
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import GraphpassError

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's hard limit is 2 GB; leave room for the graph


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    rank: int


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; every failure becomes one line that names the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise GraphpassError(f"{p}: no such file")
    if p.is_dir():
        raise GraphpassError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise GraphpassError(f"{p}: empty file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise GraphpassError(f"{p}: not a readable ONNX model ({_first_line(e)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise GraphpassError(f"{p}: protobuf holds no ONNX graph")
    _load_external(model, p.parent.resolve(), p, load_weights)
    return model


def _load_external(model: onnx.ModelProto, base: Path, p: Path, load: bool) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise GraphpassError(f"{p}: external data '{loc}' points outside the model's folder")
        if not target.is_file():
            raise GraphpassError(f"{p}: external data file '{loc}' is missing")
    if not load:
        return
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise GraphpassError(f"{p}: cannot read external data ({_first_line(e)})") from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None,
               check: bool = False, release: bool = False) -> Path:
    """Write atomically: temporary names in the same folder, then rename into place.

    Weights go to `<name>.data` beside the file when they pass 1 GB (or external=True). The
    bytes move out of memory while the graph is serialized and are read back afterwards, unless
    release=True (the caller is done with the model: its tensors then stay external).
    With check=True, onnx.checker runs on the very bytes that are written.
    """
    p = Path(path)
    if not p.parent.exists():
        raise GraphpassError(f"{p.parent}: output folder does not exist")
    if not os.access(p.parent, os.W_OK):
        raise GraphpassError(f"{p.parent}: output folder is not writable")
    if external is None:
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    data_name = p.name + ".data"
    tmp_data = Path(tmp + ".data")
    moved = []
    try:
        if external:
            moved = _write_external(model, tmp_data, data_name)
        payload = model.SerializeToString()
        if check:
            try:
                onnx.checker.check_model(payload)
            except onnx.checker.ValidationError as e:
                raise GraphpassError(f"rewritten graph fails onnx.checker: {_first_line(e)}") from None
        with open(tmp, "wb") as f:
            f.write(payload)
        del payload
        if moved and not release:
            _read_back(moved, tmp_data)
        if external:
            os.replace(tmp_data, p.parent / data_name)
        os.replace(tmp, p)
    except BaseException:
        if moved and not release and tmp_data.exists():
            _read_back(moved, tmp_data)
        for f in (Path(tmp), tmp_data):
            f.unlink(missing_ok=True)
        raise
    return p


def _read_back(moved: list, data_path: Path) -> None:
    with open(data_path, "rb") as f:
        for t, offset, length in moved:
            f.seek(offset)
            t.raw_data = f.read(length)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT


def _write_external(model: onnx.ModelProto, data_path: Path, location: str, threshold: int = 1024) -> list:
    """Move every large initializer's bytes into one data file (64-byte aligned offsets)."""
    from onnx.external_data_helper import set_external_data

    moved = []
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
                if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > threshold:
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
                else:
                    continue
            if len(t.raw_data) < threshold:
                continue
            f.seek(-f.tell() % 64, 1)
            offset = f.tell()
            f.write(t.raw_data)
            set_external_data(t, location, offset, len(t.raw_data))
            moved.append((t, offset, len(t.raw_data)))
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    return moved


def model_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus every external data file it references."""
    p = Path(path)
    total = p.stat().st_size
    m = onnx.load(str(p), load_external_data=False)
    from onnx.external_data_helper import _get_all_tensors

    locs = {e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"}
    return total + sum((p.parent / loc).stat().st_size for loc in locs if (p.parent / loc).is_file())


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(vi.name, dtype, len(tt.shape.dim)))
    return specs


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (reports, JSON): temp name in the same folder, then rename."""
    return write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    p = Path(path)
    if not p.parent.exists():
        raise GraphpassError(f"{p.parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (stable for sorted graphs)."""
    nodes = list(graph.node)
    avail = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    prod = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {prod[i] for i in _all_inputs(n) if i not in avail and i in prod}
        waiting[k] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(k)
    import heapq

    ready = [k for k, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for r in readers.get(k, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise GraphpassError("graph has a cycle; cannot order its nodes")
    graph.ClearField("node")
    graph.node.extend(order)


def _all_inputs(n: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including outer-scope names its subgraphs read."""
    names = list(n.input)
    for a in n.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for sub in g.node:
                names += _all_inputs(sub)
    return names


def prune_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers no node reads; returns how many."""
    used = {i for n in graph.node for i in _all_inputs(n)} | {o.name for o in graph.output}
    unused = [k for k, t in enumerate(graph.initializer) if t.name not in used]
    for k in reversed(unused):  # in place: no copy of the weights that stay
        del graph.initializer[k]
    return len(unused)
