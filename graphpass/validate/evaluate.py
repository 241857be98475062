"""Compare a rewritten graph with its FP32 reference, batch by batch (memory does not grow with N;
one session at a time, the reference's outputs kept on disk meanwhile).

Causal LM, with p = softmax(reference logits), q = softmax(candidate logits) at every position:
  perplexity = exp(mean_t -log softmax(logits_t)[x_{t+1}])      (for both graphs)
  KL         = mean_t sum_v p_v (log p_v - log q_v)
  top-1      = mean_t [argmax p == argmax q]
Encoder: cosine similarity of the output vectors per (unmasked) token, mean and min.
Always, per output: max |ref - cand| and mean |ref - cand|.

With-past graphs (graph/decode.py) are compared on their logits only (never present.*): by
default from one prefill over the data's (empty) past, which gives every position's logits;
with decode_from = P, from a prefill of P tokens then one token per step to the window's end,
and every metric is taken over the decoded positions P..S-1 only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from graphpass.progress import bar

from graphpass.calibrate.data import batches, check_data
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, PastLayout, load_layout
from graphpass.graph.io import load_model, output_names
from graphpass.graph.runtime import make_session


def model_kind(path: str | os.PathLike, model=None) -> str:
    """'causal-lm' or 'encoder': model.json beside the file if present, else inferred from names."""
    meta = Path(path).parent / "model.json"
    if meta.is_file():
        try:
            kind = json.loads(meta.read_text()).get("kind")
            if kind in ("causal-lm", "encoder"):
                return kind
        except (OSError, ValueError):
            pass
    model = model if model is not None else load_model(path, load_weights=False)
    return "causal-lm" if output_names(model)[0] == "logits" else "encoder"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class _Stats:
    """Running sums; every metric is a ratio of two of them."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + float(value)

    def max(self, key: str, value: float) -> None:
        self.s[key] = max(self.s.get(key, -np.inf), float(value))

    def min(self, key: str, value: float) -> None:
        self.s[key] = min(self.s.get(key, np.inf), float(value))


def _causal(st: _Stats, ids: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> None:
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    tgt = ids[:, 1:, None]
    st.add("nll_ref", -np.take_along_axis(lp[:, :-1], tgt, -1).sum())
    st.add("nll_cand", -np.take_along_axis(lq[:, :-1], tgt, -1).sum())
    st.add("next_tokens", tgt.size)
    st.add("kl", (np.exp(lp) * (lp - lq)).sum(-1).sum())
    st.add("top1", (lp.argmax(-1) == lq.argmax(-1)).sum())
    st.add("positions", lp.shape[0] * lp.shape[1])


def _encoder(st: _Stats, mask: np.ndarray | None, ref: np.ndarray, cand: np.ndarray) -> None:
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    cos = (r * c).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1), 1e-30)
    keep = mask.astype(bool) if mask is not None and mask.shape == cos.shape else np.ones(cos.shape, bool)
    st.add("cos", cos[keep].sum())
    st.add("tokens", keep.sum())
    st.min("cos_min", cos[keep].min() if keep.any() else 1.0)


def _check_scorable(kind: str, data: dict[str, np.ndarray]) -> None:
    """Refuse, before any work, data on which no metric is defined."""
    if kind == "causal-lm":
        ids = data.get("input_ids")
        if ids is None:
            raise GraphpassError("causal-lm evaluation needs an 'input_ids' input")
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise GraphpassError("no token to score: causal-lm sequences need 2+ tokens")
    elif "attention_mask" in data and not np.asarray(data["attention_mask"]).any():
        raise GraphpassError("no token to score: the attention mask is all zeros")


def evaluate(candidate: str | os.PathLike, reference: str | os.PathLike, data: dict[str, np.ndarray],
             batch_size: int = 2, threads: int = 2, kind: str | None = None,
             progress: bool = True, ref_cache: str | os.PathLike | None = None,
             decode_from: int = 0) -> dict:
    """Run both graphs over `data` and return the metrics above as a JSON-ready dict.

    `ref_cache`: a folder keeping the reference's outputs between calls (the accuracy budget
    evaluates many candidates against one reference); reused only for the same reference file,
    data, batch size and outputs."""
    ref_model = load_model(reference, load_weights=False)
    cand_model = load_model(candidate, load_weights=False)
    n = check_data(data, ref_model, "data")
    check_data(data, cand_model, "data")
    outs = output_names(ref_model)
    if output_names(cand_model) != outs:
        raise GraphpassError(f"{candidate}: outputs {output_names(cand_model)} differ from the reference's {outs}")
    layout = load_layout(reference, ref_model)
    outs = [layout.logits] if layout is not None else outs
    if decode_from and layout is None:
        raise GraphpassError(f"{reference}: decode-mode evaluation needs a with-past graph")
    kind = kind or model_kind(reference, ref_model)
    _check_scorable(kind, data)
    st, bs = _Stats(), list(batches(data, batch_size))
    with tempfile.TemporaryDirectory(prefix="graphpass-eval-") as tmp:
        # One graph at a time: the reference's outputs wait on disk, so peak memory is that of the
        # larger session, not of both (a 2.4 GB model and its smoothed copy would need 2x).
        ref_dir = Path(ref_cache) if ref_cache is not None else Path(tmp)
        key = _reference_key(reference, data, batch_size, outs) + f" decode_from={decode_from}"
        if not (ref_dir / "key.txt").is_file() or (ref_dir / "key.txt").read_text() != key:
            ref_dir.mkdir(parents=True, exist_ok=True)
            (ref_dir / "key.txt").unlink(missing_ok=True)
            sess = make_session(reference, threads)
            for k, b in enumerate(bar(bs, "eval reference", "batch", enabled=progress)):
                for i, v in enumerate(_forward(sess, outs, b, layout, decode_from)):
                    np.save(ref_dir / f"{k}-{i}.npy", v)
            sess = None
            (ref_dir / "key.txt").write_text(key)
        sess = make_session(candidate, threads)
        for k, b in enumerate(bar(bs, "eval candidate", "batch", enabled=progress)):
            c = _forward(sess, outs, b, layout, decode_from)
            r = [np.load(ref_dir / f"{k}-{i}.npy", mmap_mode="r") for i in range(len(outs))]
            _compare(st, kind, outs, _scored(b, decode_from), r, c)
            del r
    res = _summary(st.s, kind, n, outs)
    if decode_from:
        res["decode_from"] = decode_from
    return res


def _forward(sess, outs: list[str], b: dict, layout: PastLayout | None, decode_from: int) -> list:
    """The outputs compared for one batch (see the module docstring for with-past graphs)."""
    if layout is None:
        return sess.run(outs, b)
    run = DecodeRunner(sess, layout)
    return [run.decode_window(b, decode_from) if decode_from else run.logits(b)]


def _scored(b: dict, decode_from: int) -> dict:
    """The batch as the metrics see it: in decode mode, the decoded positions only."""
    return {**b, "input_ids": b["input_ids"][:, decode_from:]} if decode_from else b


def _reference_key(reference, data: dict[str, np.ndarray], batch_size: int, outs: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(data):
        h.update(name.encode() + str(data[name].shape).encode() + str(data[name].dtype).encode())
        h.update(np.ascontiguousarray(data[name]).tobytes())
    st = Path(reference).stat()
    return f"{Path(reference).resolve()} {st.st_size} {st.st_mtime_ns} {batch_size} {outs} {h.hexdigest()}"


def _compare(st: _Stats, kind: str, outs: list[str], b: dict, r: list, c: list) -> None:
    for name, rv, cv in zip(outs, r, c):
        d = np.abs(rv.astype(np.float64) - cv.astype(np.float64))
        st.max(f"max_abs:{name}", d.max() if d.size else 0.0)
        st.add(f"sum_abs:{name}", d.sum())
        st.add(f"count:{name}", d.size)
    if kind == "causal-lm":
        _causal(st, b["input_ids"], r[0], c[0])
    else:
        _encoder(st, b.get("attention_mask"), r[0], c[0])


def _summary(s: dict, kind: str, n: int, outs: list[str]) -> dict:
    res: dict = {"kind": kind, "samples": n}
    if s.get("next_tokens" if kind == "causal-lm" else "tokens", 0) == 0:
        raise GraphpassError("no token to score: sequences need 2+ tokens (causal-lm) "
                             "or an attention mask with ones (encoder)")
    if kind == "causal-lm":
        res.update(
            perplexity_reference=float(np.exp(s["nll_ref"] / s["next_tokens"])),
            perplexity_candidate=float(np.exp(s["nll_cand"] / s["next_tokens"])),
            kl=max(0.0, s["kl"] / s["positions"]),
            top1=s["top1"] / s["positions"],
            tokens=int(s["positions"]),
        )
    else:
        res.update(cosine_mean=s["cos"] / s["tokens"], cosine_min=s["cos_min"], tokens=int(s["tokens"]))
    res["outputs"] = {o: {"max_abs": s[f"max_abs:{o}"], "mean_abs": s[f"sum_abs:{o}"] / max(s[f"count:{o}"], 1)}
                      for o in outs}
    return res


def format_report(res: dict) -> str:
    lines = [f"{res['kind']}, {res['samples']} samples, {res['tokens']} tokens"]
    if res["kind"] == "causal-lm":
        ratio = res["perplexity_candidate"] / res["perplexity_reference"]
        lines += [f"  perplexity  reference {res['perplexity_reference']:.4f}   "
                  f"candidate {res['perplexity_candidate']:.4f}   ({ratio:.4f}x)",
                  f"  KL(ref||cand) {res['kl']:.6f}   top-1 agreement {res['top1']:.4f}"]
    else:
        lines.append(f"  cosine  mean {res['cosine_mean']:.6f}   min {res['cosine_min']:.6f}")
    for name, e in res["outputs"].items():
        lines.append(f"  {name}: max abs err {e['max_abs']:.3g}   mean abs err {e['mean_abs']:.3g}")
    return "\n".join(lines)
