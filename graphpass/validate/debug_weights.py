"""The weights of a merged debug graph: shared where equal, memory-mapped by onnxruntime.

onnxruntime reads external data only inside the model's folder (symlinks resolved) and maps it
rather than copying it; onnx.checker refuses data files with several hard links. So the merged
model is written beside the reference and reads the reference's data files in place; the
candidate's inline weights go once to a temporary data file there; a candidate weight equal to
a reference weight (an unchanged embedding table) is not stored at all.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

INLINE_BYTES = 1024        # initializers below this stay in the merged protobuf


class WeightFolder:
    """Where the merged model is saved so that onnxruntime can memory-map every large weight.

    onnxruntime only reads external data inside the model's folder (symlinks resolved), and
    onnx.checker refuses data files with several hard links, so nothing is linked: the merged
    model goes beside the reference under a hidden temporary name and reads the reference's
    data files where they are; the candidate's inline weights are written once to a temporary
    data file there, and data files from elsewhere are copied in. When the reference's folder
    is not writable, a temporary folder receives copies of everything.
    """

    def __init__(self, ref_dir: Path):
        self.created: list[Path] = []
        self.own_dir = not os.access(ref_dir, os.W_OK)
        self.dir = Path(tempfile.mkdtemp(prefix="graphpass-debug-")) if self.own_dir else ref_dir
        fd, name = tempfile.mkstemp(prefix=".graphpass-debug-", suffix=".onnx", dir=self.dir)
        os.close(fd)
        self.path = Path(name)
        self.created.append(self.path)
        self._copies: dict[Path, str] = {}
        self._inline = None

    def locate(self, src: Path) -> str:
        """A location for the data file `src`, relative to the merged model."""
        src = src.resolve()
        if self.dir.resolve() in src.parents:
            return os.path.relpath(src, self.dir.resolve())
        if src not in self._copies:
            dst = self.path.with_suffix(f".copy{len(self._copies)}.data")
            self.created.append(dst)
            shutil.copyfile(src, dst)
            self._copies[src] = dst.name
        return self._copies[src]

    def write(self, t: onnx.TensorProto) -> tuple[str, int, int]:
        if self._inline is None:
            dst = self.path.with_suffix(".inline.data")
            self.created.append(dst)
            self._inline = open(dst, "wb")
        f = self._inline
        f.seek(-f.tell() % 4096, 1)           # page-aligned: mapped, not copied
        offset = f.tell()
        f.write(t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes())
        return Path(f.name).name, offset, f.tell() - offset

    def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def remove(self) -> None:
        self.close()
        for p in self.created:
            p.unlink(missing_ok=True)
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _digest(t: onnx.TensorProto, base: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        left = int(info["length"]) if "length" in info else None
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            while left is None or left > 0:
                chunk = f.read(1 << 24 if left is None else min(1 << 24, left))
                if not chunk:
                    break
                h.update(chunk)
                left = None if left is None else left - len(chunk)
    else:
        h.update(t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes())
    return h.digest()


def shared_weights(ref: onnx.GraphProto, cand: onnx.GraphProto, ref_base: Path, cand_base: Path
                   ) -> dict[str, str]:
    """Candidate initializer -> reference initializer holding the same bytes (an unchanged
    embedding table, say): the merged graph reads one copy."""
    def key(t):
        return (t.data_type, tuple(t.dims))
    big = [t for t in cand.initializer if t.data_type != TensorProto.STRING and
           (t.data_location == TensorProto.EXTERNAL or t.ByteSize() >= INLINE_BYTES)]
    wanted = {key(t) for t in big}
    by_digest: dict[tuple, str] = {}
    for t in ref.initializer:
        if key(t) in wanted and t.data_type != TensorProto.STRING:
            by_digest.setdefault((key(t), _digest(t, ref_base)), t.name)
    have = {k for k, _ in by_digest}
    out = {}
    for t in big:
        hit = by_digest.get((key(t), _digest(t, cand_base))) if key(t) in have else None
        if hit is not None:
            out[t.name] = hit
    return out


def move_initializers(src: onnx.GraphProto, dst: onnx.GraphProto, base: Path, rename,
                       folder: WeightFolder, skip=frozenset()) -> None:
    """Small tensors stay inline; large ones become external data inside `folder`."""
    for t in src.initializer:
        if t.name in skip:
            continue
        external = t.data_location == TensorProto.EXTERNAL
        c = dst.initializer.add()
        if external:
            c.CopyFrom(t)
            info = {e.key: e.value for e in t.external_data}
            loc = folder.locate(base / info["location"])
            next(e for e in c.external_data if e.key == "location").value = loc
        elif t.ByteSize() < INLINE_BYTES or t.data_type == TensorProto.STRING:
            c.CopyFrom(t)
        else:
            loc, offset, length = folder.write(t)
            c.name, c.data_type, c.data_location = t.name, t.data_type, TensorProto.EXTERNAL
            c.dims.extend(t.dims)
            for k, v in (("location", loc), ("offset", str(offset)), ("length", str(length))):
                c.external_data.add(key=k, value=v)
        c.name = rename(t.name)
