"""Compare a rewritten graph with its FP32 reference, batch by batch: memory does not grow with the
number of samples nor with the vocabulary beyond one batch of outputs. One session at a time; the
reference's outputs wait on disk (plain reads, a chunk of rows at a time) with its side of the
metrics (graphpass.validate.metrics, which reduces every metric in row chunks). Both sessions run
without onnxruntime's memory arena: with it, a freed batch of logits stayed reserved beside the
next one (2 x 512 tokens x 262,144 vocabulary: 1 GB more per session).

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

from graphpass.calibrate.data import as_data, batches, check_data
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, PastLayout, conform_empty_past, load_layout
from graphpass.graph.io import load_model, output_names
from graphpass.graph.runtime import fixed_mmap_threshold, make_session
from graphpass.validate.metrics import (FileRows, RefRows, Sums, candidate_rows, encoder_keep, encoder_rows,
                                        error_rows, next_tokens, reference_rows, summary, write_rows)

CACHE_FORMAT = "graphpass-eval-reference-2"   # the layout of a reference cache folder (ref_cache)


OUTPUT_BUDGET = 256 << 20            # bytes of outputs per batch and model (see capped_batch)


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


def evaluate(candidate: str | os.PathLike, reference: str | os.PathLike,
             data: dict[str, np.ndarray] | str | os.PathLike,
             batch_size: int = 2, threads: int = 2, kind: str | None = None,
             progress: bool = True, ref_cache: str | os.PathLike | None = None,
             decode_from: int = 0) -> dict:
    """Run both graphs over `data` and return the metrics above as a JSON-ready dict.

    `ref_cache`: a folder keeping the reference's outputs between calls (the accuracy budget
    evaluates many candidates against one reference); reused only for the same reference file,
    data, batch size and outputs."""
    data = as_data(data)      # an .npz path, or a dict of arrays
    ref_model = load_model(reference, load_weights=False)
    cand_model = load_model(candidate, load_weights=False)
    ref_layout, cand_layout = load_layout(reference, ref_model), load_layout(candidate, cand_model)
    cand_data = conform_empty_past(cand_layout, data)     # an int8-cache candidate, float data
    data = conform_empty_past(ref_layout, data)
    n = check_data(data, ref_model, "data")
    check_data(cand_data, cand_model, "data")
    outs = output_names(ref_model)
    if output_names(cand_model) != outs:
        raise GraphpassError(f"{candidate}: outputs {output_names(cand_model)} differ from the reference's {outs}")
    layout = ref_layout
    outs = [layout.logits] if layout is not None else outs
    if decode_from and layout is None:
        raise GraphpassError(f"{reference}: decode-mode evaluation needs a with-past graph")
    kind = kind or model_kind(reference, ref_model)
    _check_scorable(kind, data)
    batch_size = capped_batch(ref_model, outs, data, batch_size)
    del ref_model, cand_model          # a single-file model's protobuf holds every weight
    bs = list(batches(data, batch_size))
    fixed_mmap_threshold()
    with tempfile.TemporaryDirectory(prefix="graphpass-eval-") as tmp:
        # One graph at a time: the reference's outputs wait on disk, so peak memory is that of the
        # larger session, not of both (a 2.4 GB model and its smoothed copy would need 2x).
        ref_dir = Path(ref_cache) if ref_cache is not None else Path(tmp)
        key = _reference_key(reference, data, batch_size, outs) + f" decode_from={decode_from}"
        if not (ref_dir / "key.txt").is_file() or (ref_dir / "key.txt").read_text() != key:
            ref_dir.mkdir(parents=True, exist_ok=True)
            (ref_dir / "key.txt").unlink(missing_ok=True)
            _run_reference(reference, threads, outs, kind, bs, ref_dir, progress, layout, decode_from)
            (ref_dir / "key.txt").write_text(key)
        st = _run_candidate(candidate, threads, outs, kind, list(batches(cand_data, batch_size)), ref_dir, progress,
                            cand_layout if layout is not None else None, decode_from)
    res = summary(st.s, kind, n, outs)
    if decode_from:
        res["decode_from"] = decode_from
    return res


def capped_batch(model, outs: list[str], data: dict[str, np.ndarray], batch_size: int,
                 budget: int = OUTPUT_BUDGET) -> int:
    """The largest batch <= `batch_size` whose outputs fit `budget` bytes per model (at least 1).

    At 512 tokens x 262,144 a sample holds 512 MiB of logits: batch 2 would hold 1 GiB per model,
    over 2 x a small model + 1 GiB. Unknown sizes leave the batch as given."""
    seq = next((int(v.shape[1]) for v in data.values() if np.ndim(v) == 2), 1)
    per = sample_output_bytes(model, outs, seq)
    return max(1, min(batch_size, budget // per)) if per else batch_size


def sample_output_bytes(model, outs: list[str], seq: int) -> int | None:
    """Bytes of one sample's outputs named in `outs`: each output's dims after the batch axis, a
    symbolic one read as the sequence length `seq`, at 4 bytes each; None when a size is unknown."""
    per = 0
    for o in model.graph.output:
        if o.name not in outs:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (seq if d.dim_param else 0)
                for d in o.type.tensor_type.shape.dim[1:]]
        if not dims or 0 in dims:
            return None
        per += 4 * int(np.prod(dims))
    return per or None


def _run_reference(reference, threads: int, outs: list[str], kind: str, bs: list[dict], ref_dir: Path,
                   progress: bool, layout: PastLayout | None, decode_from: int) -> None:
    """The reference's outputs to ref_dir/{batch}-{output}.npy, and for a causal LM its side of
    the metrics (NLL sums; per-row max, log-sum and argmax) to ref_dir/{batch}-ref.npz and -sums.npy."""
    sess = make_session(reference, threads, arena=False)
    for k, b in enumerate(bar(bs, "eval reference", "batch", enabled=progress)):
        vals = _forward(sess, outs, b, layout, decode_from)
        _spill(ref_dir, k, kind, _scored(b, decode_from), vals)
        del vals                       # no name outlives the batch's outputs


def _spill(ref_dir: Path, k: int, kind: str, b: dict, vals: list) -> None:
    for i in range(len(vals)):
        write_rows(ref_dir / f"{k}-{i}.npy", vals[i])
    if kind == "causal-lm":
        st = Sums()
        reference_rows(vals[0], next_tokens(b["input_ids"]), st).save(ref_dir / f"{k}-ref.npz")
        np.save(ref_dir / f"{k}-sums.npy", np.array([st.s["nll_ref"], st.s["next_tokens"], st.s["positions"]]))


def _run_candidate(candidate, threads: int, outs: list[str], kind: str, bs: list[dict], ref_dir: Path,
                   progress: bool, layout: PastLayout | None, decode_from: int) -> Sums:
    """The candidate batch by batch, each output compared with the reference's a chunk at a time."""
    st = Sums()
    sess = make_session(candidate, threads, arena=False)
    for k, b in enumerate(bar(bs, "eval candidate", "batch", enabled=progress)):
        refs = [FileRows(ref_dir / f"{k}-{i}.npy") for i in range(len(outs))]
        try:
            _compare(st, kind, outs, _scored(b, decode_from), refs, _forward(sess, outs, b, layout, decode_from),
                     ref_dir, k)
        finally:
            for r in refs:
                r.close()
    return st


def _compare(st: Sums, kind: str, outs: list[str], b: dict, refs: list[FileRows], vals: list,
             ref_dir: Path, k: int) -> None:
    bst = Sums()                       # this batch's, folded in whole: both passes sum alike
    if kind == "causal-lm":
        nll, count, positions = np.load(ref_dir / f"{k}-sums.npy")
        st.add("nll_ref", nll)
        st.add("next_tokens", count)
        st.add("positions", positions)
        candidate_rows(vals[0], next_tokens(b["input_ids"]), refs[0], RefRows.load(ref_dir / f"{k}-ref.npz"),
                       bst, outs[0])
    else:
        encoder_rows(refs[0], vals[0], encoder_keep(b.get("attention_mask"), refs[0].shape), bst, outs[0])
    for name, r, v in zip(outs[1:], refs[1:], vals[1:]):
        error_rows(name, r, v, bst)
    st.merge(bst)


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
    return (f"{CACHE_FORMAT} {Path(reference).resolve()} {st.st_size} {st.st_mtime_ns} {batch_size} {outs} "
            f"{h.hexdigest()}")


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
