"""Model I/O and graph bookkeeping shared by every command.

load_model(path)            -> ModelProto with external data resolved, or a one-line GraphpassError
                               (also for opset < 13, float16 models, and graphs onnx.checker refuses)
save_model(model, path)     -> atomic write (temp name + rename); external data past 1 GB
model_size(path)            -> bytes on disk, external data files included
input_specs(model)          -> [(name, numpy dtype, rank)] of the real graph inputs
save_graph(graph, path)     -> the same for a gs.Graph, one weight at a time
"""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from graphpass.errors import GraphpassError

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's hard limit is 2 GB; leave room for the graph
MIN_OPSET = 13                     # per-axis QuantizeLinear, ReduceMin/Max semantics used here
HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    rank: int
    limit: int | None = None   # ids index a table of this many rows (Gather on axis 0)


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
    _check_supported(model, p)
    _load_external(model, p.parent.resolve(), p, load_weights)
    return model


def opset_version(model: onnx.ModelProto, default: int | None = 13) -> int | None:
    """The default-domain opset the model imports (`default` when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)


def _check_supported(model: onnx.ModelProto, p: Path) -> None:
    """Refuse, on one line, what graphpass cannot rewrite: old opsets, float16 graphs, invalid graphs."""
    opset = opset_version(model, None)
    if opset is not None and opset < MIN_OPSET:
        raise GraphpassError(f"{p}: opset {opset} is older than {MIN_OPSET}; convert it first "
                             f"(onnx.version_converter.convert_version(model, 17))")
    g = model.graph
    typed = [(v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)]
    typed += [(t.name, t.data_type) for t in g.initializer]
    half = next(((n, HALF_TYPES[t]) for n, t in typed if t in HALF_TYPES), None)
    if half is not None:
        raise GraphpassError(f"{p}: {half[1]} model ('{half[0]}' is {half[1]}); graphpass rewrites "
                             "float32 graphs: export or convert it to float32 first")
    try:
        onnx.checker.check_model(_skeleton(model))
    except Exception as e:  # ValidationError, or a C++ error surfacing as RuntimeError
        why = " ".join(str(e).split())[:300] or type(e).__name__   # its messages span lines
        raise GraphpassError(f"{p}: invalid ONNX graph, onnx.checker says: {why}") from None


def _skeleton(model: onnx.ModelProto, remap: bool = True) -> onnx.ModelProto:
    """The graph without weight data (initializers, and branches' own initializers in external data,
    become typed inputs), for onnx.checker (which would look for external data beside the cwd).

    Checking this instead of the model keeps the check cheap and possible past 2 GB. With remap,
    ops that onnxruntime registers in the ONNX domain but onnx does not know
    (SimplifiedLayerNormalization, ...) move to a private domain, which the checker does not judge.
    """
    g, sk = model.graph, onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.opset_import.append(helper.make_opsetid(_ORT_DOMAIN, 1))
    sk.graph.name = g.name
    sk.graph.input.extend(g.input)
    sk.graph.output.extend(g.output)
    sk.graph.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    weights = [t for t in g.initializer if t.name not in declared]
    for n in g.node:
        if n.op_type == "Constant" and n.ByteSize() > 4096 and n.attribute[0].name == "value":
            v = n.attribute[0].t     # a weight stored as a Constant node: declared, not copied
            weights.append(onnx.TensorProto(name=n.output[0], data_type=v.data_type, dims=v.dims))
            continue
        sk.graph.node.append(n)
        if remap:     # the node and the nodes of its branches (If / Loop / Scan bodies)
            for m in _nodes(sk.graph.node[-1]):
                if m.domain in ("", "ai.onnx") and m.op_type in _ort_only_ops():
                    m.domain = _ORT_DOMAIN
    from graphpass.graph.gs_io import proto_graphs

    for sub in proto_graphs(sk)[1:]:   # a branch's own weight in external data: read from the outer scope
        ext = [t for t in sub.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        for t in ext:
            weights.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
            sub.initializer.remove(t)
    seen = set(declared)
    for t in weights:
        if t.name not in seen:
            seen.add(t.name)
            sk.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return sk


_ORT_DOMAIN = "graphpass.onnxruntime_only"


def _nodes(n: onnx.NodeProto):
    """n and every node inside its subgraph attributes, recursively."""
    yield n
    for a in n.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for m in sub.node:
                yield from _nodes(m)


@lru_cache(maxsize=1)
def _ort_only_ops() -> frozenset[str]:
    import onnx.defs
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    names = {s.name for s in ort_c.get_all_operator_schema() if s.domain in ("", "ai.onnx")}
    return frozenset(n for n in names if not onnx.defs.has(n))


def _load_external(model: onnx.ModelProto, base: Path, p: Path, load: bool) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    sizes: dict[Path, int] = {}
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise GraphpassError(f"{p}: external data '{loc}' points outside the model's folder")
        if not target.is_file():
            raise GraphpassError(f"{p}: external data file '{loc}' is missing")
        size = sizes.setdefault(target, target.stat().st_size)
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise GraphpassError(f"{p}: cannot read external data: tensor '{t.name}' has a bad "
                                 "offset or length") from None
        if end > size:
            raise GraphpassError(f"{p}: cannot read external data: '{loc}' holds {size} bytes, "
                                 f"tensor '{t.name}' needs {end} (truncated?)")
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
    if external is None:
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    made, moved = [], []
    try:
        tmp = temp_beside(p, made=made)
        tmp_data = Path(tmp + ".data")
        made.append(str(tmp_data))
        if external:
            moved = _write_external(model, tmp_data, p.name + ".data")
        _commit(model, p, tmp, tmp_data if external else None, check, [] if release else moved, moved)
    except BaseException as e:
        if moved and not release and tmp_data.exists():
            _read_back(moved, tmp_data)
        _discard(made)
        _raise_write_error(e, p)
    return p


def save_graph(graph, path: str | os.PathLike, external: bool | None = None, check: bool = False) -> Path:
    """Export a gs.Graph and write it like save_model, one weight at a time.

    gs.export_onnx would copy every rewritten weight into the protobuf while the graph still holds
    it; here each large constant is exported as a stub and its bytes written on their own (into
    the protobuf, or into `<name>.data` past 1 GB), the graph's array released as it goes. Weights
    still lazy in the source's external data are copied over: the output is self-contained.
    The graph's values are consumed: do not use it afterwards.
    """
    from graphpass.graph.gs_io import export_graph, fill, initializers, is_stub, nbytes, tensor_bytes

    p = Path(path)
    model, pending = export_graph(graph)
    if external is None:
        external = sum(nbytes(c) for c in pending.values()) > EXTERNAL_DATA_THRESHOLD
    made = []
    try:
        tmp = temp_beside(p, made=made)
        tmp_data = Path(tmp + ".data")
        made.append(str(tmp_data))
        # a name stubbed once: a sibling branch's own initializer of that name was exported whole
        stubs = [t for t in initializers(model) if t.name in pending and is_stub(t)]
        if external:
            with open(tmp_data, "wb") as f:
                for t in stubs:
                    _append_external(f, t, tensor_bytes(pending.pop(t.name)), p.name + ".data")
        else:
            for t in stubs:
                fill(t, pending.pop(t.name), release=True)
        _commit(model, p, tmp, tmp_data if external else None, check, False, external)
    except BaseException as e:
        _discard(made)
        _raise_write_error(e, p)
    return p


def _append_external(f, t: onnx.TensorProto, data: bytes, location: str) -> None:
    f.seek(-f.tell() % 64, 1)
    offset = f.tell()
    f.write(data)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
        t.external_data.add(key=k, value=v)
    t.data_location = onnx.TensorProto.EXTERNAL


def _commit(model: onnx.ModelProto, p: Path, tmp: str, tmp_data: Path | None, check: bool,
            read_back, external_refs) -> None:
    """Serialize, check the very bytes, write, rename (model and data file together)."""
    payload = model.SerializeToString()
    if check:    # external tensors: the checker would look for their file beside the cwd
        try:
            ort_only = any(m.domain in ("", "ai.onnx") and m.op_type in _ort_only_ops()   # SimplifiedLayerNormalization
                           for n in model.graph.node for m in _nodes(n))                   # (genai), in branches too
            onnx.checker.check_model(_skeleton(model, remap=ort_only) if external_refs or ort_only
                                     else payload)
        except onnx.checker.ValidationError as e:
            raise GraphpassError(f"rewritten graph fails onnx.checker: {_first_line(e)}") from None
    with open(tmp, "wb") as f:
        f.write(payload)
    del payload
    if read_back:
        _read_back(read_back, tmp_data)
    with _signals_deferred():    # the model and its data file change together, or neither does
        if tmp_data is not None:
            os.replace(tmp_data, p.parent / (p.name + ".data"))
        os.replace(tmp, p)


def temp_beside(p: Path, suffix: str = ".tmp", made: list | None = None) -> str:
    """A new, empty temporary file in p's folder (its name is also appended to `made`, with no
    gap a signal could fall into), or a one-line error saying why it cannot be created there.

    The file is really created: permission checks (os.access) say nothing useful for root.
    """
    if p.is_dir():
        raise GraphpassError(f"{p}: is a directory; give a file name for the output")
    if not p.parent.exists():
        raise GraphpassError(f"{p.parent}: output folder does not exist")
    if not p.parent.is_dir():
        raise GraphpassError(f"{p.parent}: is not a folder; cannot write {p.name} there")
    with _signals_deferred():
        try:
            fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=p.parent)
        except OSError as e:
            raise GraphpassError(f"{p.parent}: cannot write there ({e.strerror or e})") from None
        if made is not None:
            made.append(name)
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp's 0600 would stick to the renamed output
        os.close(fd)
    return name


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _discard(names: list) -> None:
    for n in names:
        Path(n).unlink(missing_ok=True)


def _raise_write_error(e: BaseException, p: Path):
    """Re-raise after cleanup; an OS error (disk full, permissions) becomes one line."""
    if isinstance(e, OSError):
        raise GraphpassError(f"{p}: cannot write it ({e.strerror or e})") from None
    raise e


@contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM arriving inside the block take effect when it ends.

    Python-level: a signal may reach any thread of the process (onnxruntime starts some), but its
    Python handler always runs in the main thread, so that handler is what waits here.
    """
    import threading

    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            any(signal.getsignal(s) is None for s in sigs):    # a handler Python cannot restore
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(got):
            if callable(old[s]):
                old[s](s, None)           # e.g. raise KeyboardInterrupt
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)    # the default action, now


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
    """Bytes on disk of a model file plus every external data file it references (read from the
    protobuf's wire format: an inline-weight model is not loaded for this)."""
    from graphpass.graph.spill import external_locations

    p = Path(path)
    locs = external_locations(p)
    return p.stat().st_size + sum((p.parent / loc).stat().st_size for loc in locs if (p.parent / loc).is_file())


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name: i for i in model.graph.initializer}
    rows: dict[str, int] = {}     # input -> rows of the smallest table it indexes
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in inits and inits[n.input[0]].dims \
                and not any(a.name == "axis" and a.i != 0 for a in n.attribute):
            rows[n.input[1]] = min(rows.get(n.input[1], 1 << 62), int(inits[n.input[0]].dims[0]))
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(vi.name, dtype, len(tt.shape.dim), rows.get(vi.name)))
    return specs


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (reports, JSON): temp name in the same folder, then rename."""
    return write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    p, made = Path(path), []
    try:
        tmp = temp_beside(p, made=made)
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, p)
    except BaseException as e:
        _discard(made)
        _raise_write_error(e, p)
    return p


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name not in `taken` (which records it)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


INLINE_SPILL_BYTES = 64 << 20   # inline weights past this are moved to a data file first


@contextmanager
def externalized(path: str | os.PathLike):
    """The model at `path`, or, when it holds its weights inline (optimum's exports up to 2 GB),
    a copy in a temporary folder with every large weight in external data.

    An inline weight can only be read with the whole protobuf: every later step (calibration,
    import, export) would hold another copy of it. After one pass here (peak: the model once)
    the weights stay on disk and are read one at a time, as for an external-data export.
    """
    import tempfile

    p = Path(path)
    if not p.is_file() or p.stat().st_size < INLINE_SPILL_BYTES:   # load_model names what is wrong
        yield p
        return
    from graphpass.graph.spill import spill

    with tempfile.TemporaryDirectory(prefix="graphpass-spill-", dir=_spill_dir(p)) as tmp:
        out = Path(tmp) / p.name
        try:
            moved = spill(p, out)
        except (ValueError, OSError):
            moved = 0      # not a protobuf we can walk: load_model says what is wrong with it
        if not moved:
            yield p
            return
        try:
            yield out
        except GraphpassError as e:   # errors name the user's file, not the copy
            raise GraphpassError(str(e).replace(str(out), str(p))) from None


def _spill_dir(p: Path) -> str | None:
    """Beside the model when that folder is writable (same disk), else the system's temp dir."""
    return str(p.parent) if os.access(p.parent, os.W_OK) else None
