"""Move a model's inline weights to an external data file without loading the model.

onnx.load of a model that holds its weights inline (optimum writes SmolLM2 as one 540 MB file)
holds the file's bytes and the parsed protobuf at once: 2x the model before any work. Here the
protobuf wire format is walked with plain reads: every initializer's raw_data of at least
`threshold` bytes is copied, in 1 MB pieces, to `<name>.data` (64-byte aligned offsets), and
the tensor is written back as a stub that points there (onnx's external-data fields). Every
other field is copied byte for byte. Peak memory: the graph without its weights.

Wire format (protobuf): a field is a varint key (number << 3 | type), then a varint (type 0),
8 bytes (type 1), a varint length and that many bytes (type 2), or 4 bytes (type 5).
ModelProto.graph is field 7, GraphProto.node field 1 and .initializer field 5, TensorProto.raw_data
field 9.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

GRAPH, INITIALIZER, RAW_DATA = 7, 5, 9
NODE = 1                          # GraphProto.node
CHUNK = 1 << 20


def spill(src: str | os.PathLike, dst: str | os.PathLike, threshold: int = 1024) -> int:
    """Write `dst` (+ `dst.data`) from `src` with large weights external; returns bytes moved."""
    src, dst = Path(src), Path(dst)
    data_name = dst.name + ".data"
    with open(src, "rb") as f, open(dst.parent / data_name, "wb") as data:
        parts, moved = [], 0
        for num, wt, start, end in _fields(f, 0, os.fstat(f.fileno()).st_size):
            if num == GRAPH and wt == 2:
                graph = bytearray()
                for gnum, gwt, gstart, gend in _fields(f, start, end):
                    if gnum == INITIALIZER and gwt == 2:
                        stub, n = _tensor(f, gstart, gend, data, data_name, threshold)
                        graph += _key(INITIALIZER, 2) + _varint(len(stub)) + stub
                        moved += n
                    else:
                        graph += _raw(f, gnum, gwt, gstart, gend)
                parts.append(_key(GRAPH, 2) + _varint(len(graph)) + bytes(graph))
            else:
                parts.append(_raw(f, num, wt, start, end))
    dst.write_bytes(b"".join(parts))
    return moved


def external_locations(path: str | os.PathLike) -> set[str]:
    """The external data files a model's initializers name, read without loading its weights."""
    out = set()
    with open(path, "rb") as f:
        for num, wt, start, end in _fields(f, 0, os.fstat(f.fileno()).st_size):
            if num != GRAPH or wt != 2:
                continue
            for gnum, gwt, gstart, gend in _fields(f, start, end):
                if gnum == INITIALIZER and gwt == 2:
                    t = onnx.TensorProto()
                    t.ParseFromString(b"".join(_raw(f, n, w, s, e) for n, w, s, e in _fields(f, gstart, gend)
                                               if n != RAW_DATA))
                    out |= {e.value for e in t.external_data if e.key == "location"}
                elif gnum == NODE and gwt == 2:   # If / Loop / Scan branches keep their own weights
                    f.seek(gstart)
                    node = onnx.NodeProto()
                    node.ParseFromString(f.read(gend - gstart))
                    out |= _subgraph_locations(node)
    return out


def _subgraph_locations(node: onnx.NodeProto) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors

    out = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            m = onnx.ModelProto(graph=g)
            out |= {e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"}
    return out


def _tensor(f, start: int, end: int, data, location: str, threshold: int) -> tuple[bytes, int]:
    """A TensorProto's bytes with raw_data moved to `data` when large (else unchanged)."""
    rest, raw = bytearray(), None
    for num, wt, s, e in _fields(f, start, end):
        if num == RAW_DATA and wt == 2 and e - s >= threshold:
            raw = (s, e)
        else:
            rest += _raw(f, num, wt, s, e)
    if raw is None:
        return bytes(rest), 0
    data.seek(-data.tell() % 64, 1)
    offset, length = data.tell(), raw[1] - raw[0]
    f.seek(raw[0])
    for k in range(0, length, CHUNK):
        data.write(f.read(min(CHUNK, length - k)))
    t = onnx.TensorProto()
    t.ParseFromString(bytes(rest))
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL
    return t.SerializeToString(), length


def _fields(f, start: int, end: int):
    """(number, wire type, payload start, payload end) of each field in f[start:end]."""
    pos = start
    while pos < end:
        f.seek(pos)
        key, pos = _read_varint(f, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, after = _read_varint(f, pos)
        elif wt == 1:
            after = pos + 8
        elif wt == 2:
            length, pos = _read_varint(f, pos)
            after = pos + length
        elif wt == 5:
            after = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} at byte {pos}")
        if after > end:
            raise ValueError(f"protobuf field {num} runs past its message (byte {after} > {end})")
        yield num, wt, pos, after
        pos = after


def _raw(f, num: int, wt: int, start: int, end: int) -> bytes:
    """The field re-encoded: key (+ length) + payload read from f."""
    f.seek(start)
    payload = f.read(end - start)
    return _key(num, wt) + (_varint(len(payload)) if wt == 2 else b"") + payload


def _read_varint(f, pos: int) -> tuple[int, int]:
    f.seek(pos)
    value, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError(f"protobuf varint cut off at byte {pos}")
        pos += 1
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value, pos
        shift += 7


def _key(num: int, wt: int) -> bytes:
    return _varint(num << 3 | wt)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)
