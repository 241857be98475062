"""Run a decoder with a KV cache (a "with-past" graph): the one place that knows how to feed it.

Two forms (see testing/past.py for tiny ones):
  optimum  inputs input_ids [b,s], attention_mask [b,P+s], position_ids [b,s] (optional),
           past_key_values.{i}.key/.value [b,kv,P,d]; outputs logits, present.{i}.key/.value.
           Rows are left-padded: position_ids = cumsum(attention_mask) - 1 over the new tokens.
  genai    onnxruntime-genai builder (GroupQueryAttention): the same inputs without position_ids;
           the graph derives seqlens_k = sum(attention_mask) - 1 and total = mask width, and keeps
           a right-padded cache. Told by a GroupQueryAttention node or genai_config.json.
A step with new tokens x [b,n] over cache C (P slots) and mask M [b,P]:
  feeds  = {input_ids: x, attention_mask: [M | 1_n], position_ids: (cumsum - 1)[-n:], past: C}
  C'     = present.*  (P + n slots),  M' = [M | 1_n]
Prefill is the step with P = 0 (an empty past: axis 2 of length 0).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from graphpass.errors import GraphpassError

PAST_PREFIX = "past_key_values."


@dataclass(frozen=True)
class PastInput:
    name: str          # graph input, e.g. past_key_values.0.key
    present: str       # graph output carrying it one step later, e.g. present.0.key
    dtype: np.dtype
    heads: int         # axis 1 (kv heads)
    head_dim: int      # axis 3


@dataclass(frozen=True)
class PastLayout:
    form: str                          # "optimum" or "genai"
    past: tuple[PastInput, ...]
    logits: str
    position_ids: bool
    mask: str = "attention_mask"
    ids: str = "input_ids"

    @property
    def past_names(self) -> list[str]:
        return [p.name for p in self.past]

    @property
    def present_names(self) -> list[str]:
        return [p.present for p in self.past]


def past_layout(model: onnx.ModelProto, folder: str | os.PathLike | None = None) -> PastLayout | None:
    """The with-past layout of `model`, or None when it takes no past (a no-cache graph).
    `folder`: where genai_config.json / model.json may sit (names and form)."""
    cfg = _genai_config(folder)
    key_pat, present_pat = _patterns(cfg)
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    past_names = [n for n in inputs if key_pat.fullmatch(n)]
    if not past_names:
        return None
    outputs = [o.name for o in model.graph.output]
    dec = (cfg or {}).get("model", {}).get("decoder", {})
    sizes = (dec.get("num_key_value_heads"), dec.get("head_size"))   # for symbolic axes 1 and 3
    past = tuple(_past_input(inputs[n], present_pat, outputs, sizes) for n in past_names)
    for need in ("input_ids", "attention_mask"):
        if need not in inputs:
            raise GraphpassError(f"with-past graph has no '{need}' input (inputs: {', '.join(inputs)})")
    logits = "logits" if "logits" in outputs else next(o for o in outputs if o not in
                                                       {p.present for p in past})
    form = _declared_form(folder)
    if form is None:
        genai = cfg is not None or any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
        form = "genai" if genai else "optimum"
    return PastLayout(form, past, logits, "position_ids" in inputs)


def _declared_form(folder) -> str | None:
    """model.json's "form" ("optimum" / "genai"), as the exports in models/ write it."""
    p = Path(folder) / "model.json" if folder is not None else None
    try:
        form = json.loads(p.read_text()).get("form") if p is not None and p.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return form if form in ("optimum", "genai") else None


def _genai_config(folder) -> dict | None:
    p = Path(folder) / "genai_config.json" if folder is not None else None
    if p is None or not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise GraphpassError(f"{p}: not readable JSON ({str(e)[:120]})") from None


def _patterns(cfg: dict | None) -> tuple[re.Pattern, tuple[str, str]]:
    """Regex of past input names; (past, present) name templates to map one onto the other."""
    names = ((cfg or {}).get("model", {}).get("decoder", {}))
    ins, outs = names.get("inputs", {}), names.get("outputs", {})
    pk = ins.get("past_key_names", PAST_PREFIX + "%d.key")
    pv = ins.get("past_value_names", PAST_PREFIX + "%d.value")
    ok = outs.get("present_key_names", "present.%d.key")
    ov = outs.get("present_value_names", "present.%d.value")
    rx = "|".join(re.escape(p).replace("%d", r"\d+") for p in (pk, pv))
    return re.compile(rx), ((pk, ok), (pv, ov))


def _past_input(vi: onnx.ValueInfoProto, templates, outputs: list[str], sizes: tuple) -> PastInput:
    present = None
    for past_t, present_t in templates:
        m = re.fullmatch(re.escape(past_t).replace("%d", r"(\d+)"), vi.name)
        if m:
            present = present_t.replace("%d", m.group(1))
    if present not in outputs:
        raise GraphpassError(f"past input '{vi.name}' has no matching output '{present}'")
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if len(dims) == 4:   # genai writes axis 3 as "kv_cache_dim": genai_config.json has the size
        dims[1], dims[3] = dims[1] or sizes[0], dims[3] or sizes[1]
    if len(dims) != 4 or dims[1] is None or dims[3] is None:
        raise GraphpassError(f"past input '{vi.name}' must be [batch, kv_heads, past, head_dim] with "
                             f"fixed kv_heads and head_dim (or genai_config.json's), got {_dims_text(tt)}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return PastInput(vi.name, present, dtype, dims[1], dims[3])


def _dims_text(tt) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in tt.shape.dim) + "]"


# ---------------------------------------------------------------------------- feeds and cache
@dataclass
class Cache:
    """What a batch carries from one step to the next: the mask so far and the past tensors."""
    mask: np.ndarray                   # int64 [b, P]
    past: dict[str, np.ndarray]        # past input name -> [b, kv, P, d]

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def empty_cache(layout: PastLayout, batch: int) -> Cache:
    past = {p.name: np.zeros((batch, p.heads, 0, p.head_dim), p.dtype) for p in layout.past}
    return Cache(np.zeros((batch, 0), np.int64), past)


def step_feeds(layout: PastLayout, cache: Cache, ids: np.ndarray,
               mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for new tokens `ids` [b,n] over `cache`; `mask` [b,n] marks padded new tokens (0)."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GraphpassError(f"new tokens must be [batch, n] with n >= 1, got shape {list(ids.shape)}")
    if ids.shape[0] != cache.mask.shape[0]:
        raise GraphpassError(f"{ids.shape[0]} rows of new tokens for a cache of {cache.mask.shape[0]}")
    new = np.ones_like(ids) if mask is None else np.asarray(mask, np.int64)
    full = np.concatenate([cache.mask, new], 1)
    feeds = {layout.ids: ids, layout.mask: full, **cache.past}
    if layout.position_ids:
        feeds["position_ids"] = np.maximum(np.cumsum(full, 1) - 1, 0)[:, -ids.shape[1]:]
    return feeds


def advance(layout: PastLayout, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Cache:
    """The cache after a step: present.* become past.*, the step's full mask is kept."""
    past = {p.name: outputs[p.present] for p in layout.past}
    return Cache(feeds[layout.mask], past)


def check_past(layout: PastLayout, feeds: dict[str, np.ndarray], source: str = "feeds") -> None:
    """Every past input present, with the graph's dtype, kv heads and head size."""
    missing = [n for n in layout.past_names if n not in feeds]
    if missing:
        more = f" (and {len(missing) - 2} more)" if len(missing) > 2 else ""
        raise GraphpassError(f"{source}: with-past graph needs past input(s) {', '.join(missing[:2])}"
                             f"{more}; build the data with `graphpass data --model`")
    for p in layout.past:
        a = feeds[p.name]
        if a.dtype != p.dtype:
            raise GraphpassError(f"{source}: past input '{p.name}' is {a.dtype}, graph expects {p.dtype}")
        if a.ndim != 4 or a.shape[1] != p.heads or a.shape[3] != p.head_dim:
            raise GraphpassError(f"{source}: past input '{p.name}' has shape {list(a.shape)}, graph "
                                 f"expects [batch, {p.heads}, past, {p.head_dim}]")


def conform_empty_past(layout: PastLayout | None, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`data` with each past input of length 0 in the graph's cache dtype: an empty past holds no
    value, so a data file built for the float-cache graph also feeds its int8-cache copy. A past
    that holds values is left as it is (check_past then names the mismatch)."""
    if layout is None:
        return data
    out = dict(data)
    for p in layout.past:
        a = out.get(p.name)
        if a is not None and a.ndim == 4 and a.shape[2] == 0 and a.dtype != p.dtype:
            out[p.name] = np.zeros(a.shape, p.dtype)
    return out


def cache_from_feeds(layout: PastLayout, feeds: dict[str, np.ndarray]) -> Cache:
    """The cache a data batch starts from: its past inputs and the mask's first P columns."""
    check_past(layout, feeds)
    lengths = {feeds[n].shape[2] for n in layout.past_names}
    if len(lengths) != 1:
        raise GraphpassError(f"past inputs disagree on the past length {sorted(lengths)}")
    P = lengths.pop()
    mask = feeds.get(layout.mask)
    if mask is None or mask.shape[1] != P + feeds[layout.ids].shape[1]:
        raise GraphpassError(f"attention_mask must be [batch, past + seq] = "
                             f"[{feeds[layout.ids].shape[0]}, {P + feeds[layout.ids].shape[1]}]")
    return Cache(np.asarray(mask[:, :P], np.int64), {n: feeds[n] for n in layout.past_names})


# ---------------------------------------------------------------------------- runner
class DecodeRunner:
    """A session over a with-past graph that keeps its cache: prefill, then step by step.

    runner = DecodeRunner(sess, layout)
    logits = runner.prefill(ids)          # [b, s, V]; the cache now holds s slots
    logits = runner.step(next_ids)        # [b, n, V]; n more slots"""

    def __init__(self, session, layout: PastLayout, extra_outputs: list[str] | None = None):
        self.sess, self.layout = session, layout
        self.extra = list(extra_outputs or [])
        self.outputs = [layout.logits, *layout.present_names, *self.extra]
        self.cache: Cache | None = None
        self.last: dict[str, np.ndarray] = {}   # every output of the last run, by name

    def reset(self, batch: int) -> None:
        self.cache = empty_cache(self.layout, batch)

    def prefill(self, ids: np.ndarray, mask: np.ndarray | None = None, **extra_feeds) -> np.ndarray:
        self.reset(np.asarray(ids).shape[0])
        return self.step(ids, mask, **extra_feeds)

    def step(self, ids: np.ndarray, mask: np.ndarray | None = None, **extra_feeds) -> np.ndarray:
        if self.cache is None:
            raise GraphpassError("decode step before prefill: no cache yet")
        feeds = step_feeds(self.layout, self.cache, ids, mask)
        return self._run({**feeds, **extra_feeds})

    def run_batch(self, batch: dict[str, np.ndarray], **extra_feeds) -> np.ndarray:
        """One step from a data batch that names every graph input (past included)."""
        self.cache = cache_from_feeds(self.layout, batch)
        return self._run({**batch, **extra_feeds})

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of one run over a data batch (past included), fetching no cache: the cheap
        path when every position's logits come from one prefill (evaluation)."""
        check_past(self.layout, batch, "data")
        return self.sess.run([self.layout.logits], batch)[0]

    def decode_window(self, batch: dict[str, np.ndarray], start: int) -> np.ndarray:
        """Logits of positions start..S-1 of a data batch produced as generation does: the batch's
        own past, a prefill of its first `start` tokens, then one token per step. [b, S-start, V]"""
        ids = batch[self.layout.ids]
        if not 1 <= start < ids.shape[1]:
            raise GraphpassError(f"decode start {start} must lie in [1, {ids.shape[1] - 1}] "
                                 f"for windows of {ids.shape[1]} tokens")
        self.cache = cache_from_feeds(self.layout, batch)
        P, mask = self.cache.length, batch[self.layout.mask]
        self.step(ids[:, :start], mask[:, P:P + start])
        return np.concatenate([self.step(ids[:, t:t + 1], mask[:, P + t:P + t + 1])
                               for t in range(start, ids.shape[1])], 1)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        vals = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        self.cache = advance(self.layout, feeds, vals)
        self.last = vals
        return vals[self.layout.logits]


def load_layout(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> PastLayout | None:
    """past_layout of the ONNX file at `path` (its folder may hold genai_config.json)."""
    from graphpass.graph.io import load_model

    model = model if model is not None else load_model(path, load_weights=False)
    return past_layout(model, Path(path).parent)


def open_runner(path: str | os.PathLike, threads: int = 2, **session_kw) -> DecodeRunner:
    """A DecodeRunner over the with-past graph at `path`; a one-line error for a no-cache graph."""
    from graphpass.graph.runtime import make_session

    layout = load_layout(path)
    if layout is None:
        raise GraphpassError(f"{Path(path).name}: takes no past_key_values.* input (not a with-past graph)")
    return DecodeRunner(make_session(path, threads, **session_kw), layout)


def is_past_name(name: str) -> bool:
    """A graph input named like a past cache tensor (past_key_values.{i}.key / .value)."""
    return bool(re.fullmatch(re.escape(PAST_PREFIX) + r"\d+\.(key|value)", name))


def is_key(past_name: str) -> bool:
    """A key cache (past_key_values.3.key, past_key_3, past_key), by name: the last dotted part
    when there is one (past_key_values.3.value is a value cache), else the name before its index."""
    if "." in past_name:
        return "key" in past_name.rsplit(".", 1)[-1]
    return past_name.endswith("key") or past_name.rsplit("_", 1)[0].endswith("key")
