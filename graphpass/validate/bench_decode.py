"""Decode speed of a with-past candidate against its FP32 reference, measured in one run.

One generation of a graph g from a prompt x of P tokens, N greedy steps:
  logits_0 = g(x | empty cache)                 time to first token (TTFT) = t(prefill + argmax)
  y_0 = argmax logits_0[-1]
  logits_i = g(y_{i-1} | cache_{i-1}), y_i = argmax logits_i   i = 1..N, one token per step,
                                                 present.* of step i-1 fed back as past.*
Reported per graph: median TTFT over generations, median step latency over every step of every
generation (ms/token), tokens/s = 1000 / ms/token; ratios candidate / reference; agreement of the
greedy tokens y_0..y_N: the common prefix and the count of equal positions.

Fair timing (FACTS.md, "Timing trap"): both sessions have spinning off, so neither one's idle
threads slow the other, and the two generations run interleaved run by run (prefill A, prefill B,
step 1 of B, step 1 of A, ...; who goes first alternates), repeated until the time budget is
spent: a drift in machine speed, even a short one, hits both graphs alike.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, PastLayout, load_layout
from graphpass.graph.io import input_specs, load_model
from graphpass.graph.runtime import make_session
from graphpass.progress import bar

MIN_ROUNDS = 2       # timed generations per graph, whatever the budget


def inspect_decoder(path: str | os.PathLike, command: str = "this command") -> tuple[PastLayout, int | None]:
    """(with-past layout, rows of the table input_ids index or None), reading the graph once;
    one line if it takes no past."""
    model = load_model(path, load_weights=False)
    layout = load_layout(path, model)
    if layout is None:
        raise GraphpassError(f"{command} needs a with-past graph (past_key_values.* inputs, present.* "
                             f"outputs); {Path(path).name} takes no past input")
    spec = next((s for s in input_specs(model) if s.name == layout.ids), None)
    return layout, spec.limit if spec is not None else None


def open_decoder(path: str | os.PathLike, threads: int = 2, command: str = "this command") -> DecodeRunner:
    """A DecodeRunner over the with-past graph at `path`; one line if it takes no past."""
    return DecodeRunner(make_session(path, threads), inspect_decoder(path, command)[0])


def check_feedback(runner: DecodeRunner, name: str) -> None:
    """After a run: each present.* must be feedable as the next step's past.* (same dtype, heads,
    head size), e.g. a graph that returns a float cache but declares an int8 past input fails."""
    for p in runner.layout.past:
        a = runner.cache.past[p.name]
        if a.dtype != p.dtype:
            raise GraphpassError(f"{name}: output '{p.present}' is {a.dtype} but past input '{p.name}' "
                                 f"takes {p.dtype}: the cache cannot be fed back")
        if a.ndim != 4 or a.shape[1] != p.heads or a.shape[3] != p.head_dim:
            raise GraphpassError(f"{name}: output '{p.present}' has shape {list(a.shape)} but past input "
                                 f"'{p.name}' takes [batch, {p.heads}, past, {p.head_dim}]")


def prompt_ids(prompt_len: int, data: dict[str, np.ndarray] | None, rows: int | None,
               seed: int = 0) -> tuple[np.ndarray, str]:
    """(ids [P], where they came from): the first window of `data` (its input_ids, without
    masked-out pads; any past arrays in it are not used: each graph starts from its own empty
    cache), else seeded ids in [0, rows)."""
    if data is None:
        hi = rows or 100
        return np.random.default_rng(seed).integers(0, hi, prompt_len).astype(np.int64), f"synthetic ids < {hi}"
    ids = data.get("input_ids")
    if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise GraphpassError("data: needs an integer 'input_ids' array [samples, seq] for the prompt")
    mask = data.get("attention_mask")
    row = ids[0][mask[0, -ids.shape[1]:] != 0] if mask is not None and mask.ndim == 2 else ids[0]
    if row.size < prompt_len:
        raise GraphpassError(f"data: the first window holds {row.size} tokens, the prompt asks {prompt_len}"
                             f" (lower --prompt-len)")
    return row[:prompt_len].astype(np.int64), "data window 0"


def lockstep_generation(runners: dict[str, DecodeRunner], prompt: np.ndarray, steps: int,
                        flip: int = 0) -> tuple[dict, dict, dict]:
    """One greedy generation of every runner, interleaved run by run: the prefills back to back,
    then step i of each, who goes first alternating every run (and with `flip`).
    Returns (tokens y_0..y_N, TTFT seconds, step seconds), each by runner name."""
    keys = list(runners)
    tokens, ttft, times = {k: [] for k in keys}, {}, {k: [] for k in keys}
    for i in range(steps + 1):
        for k in keys if (i + flip) % 2 == 0 else keys[::-1]:
            t = time.perf_counter()
            logits = (runners[k].prefill(prompt[None, :]) if i == 0 else
                      runners[k].step(np.array([[tokens[k][-1]]], np.int64)))
            tokens[k].append(int(np.argmax(logits[0, -1])))
            dt = time.perf_counter() - t
            if i == 0:
                ttft[k] = dt
                check_feedback(runners[k], k)
            else:
                times[k].append(dt)
    return tokens, ttft, times


def _agreement(cand: list[int], ref: list[int]) -> dict:
    prefix = next((i for i, (c, r) in enumerate(zip(cand, ref)) if c != r), min(len(cand), len(ref)))
    return {"prefix": prefix, "same": int(sum(c == r for c, r in zip(cand, ref))), "tokens": len(ref)}


def _summary(ttfts: list[float], steps: list[float]) -> dict:
    ms = 1e3 * float(np.median(steps)) if steps else float("nan")
    return {"ttft_ms": 1e3 * float(np.median(ttfts)), "decode_ms": ms,
            "tokens_per_s": 1e3 / ms if steps else float("nan"), "generations": len(ttfts)}


def _rounds(seconds: float) -> Iterator[int]:
    """0, 1, 2, ... while fewer than MIN_ROUNDS have run or `seconds` have not passed."""
    start, n = time.perf_counter(), 0
    while n < MIN_ROUNDS or time.perf_counter() - start < seconds:
        yield n
        n += 1


def bench_decode(candidate: str | os.PathLike, reference: str | os.PathLike, prompt_len: int = 256,
                 steps: int = 64, threads: int = 2, seconds: float = 20.0,
                 data: dict[str, np.ndarray] | None = None, progress: bool = True) -> dict:
    """TTFT, ms/token, tokens/s of both graphs from one prompt, timed in alternating generations."""
    if prompt_len < 1 or steps < 1:
        raise GraphpassError(f"prompt length and steps must be >= 1, got {prompt_len} and {steps}")
    seen = {k: inspect_decoder(p, "bench --decode") for k, p in (("reference", reference),
                                                                 ("candidate", candidate))}
    rows = [r for _, r in seen.values() if r]
    prompt, source = prompt_ids(prompt_len, data, min(rows) if rows else None)
    runners = {k: DecodeRunner(make_session(p, threads), seen[k][0])
               for k, p in (("reference", reference), ("candidate", candidate))}
    tokens = lockstep_generation(runners, prompt, steps)[0]          # warm-up, and the tokens
    ttft, step = {k: [] for k in runners}, {k: [] for k in runners}
    load = [os.getloadavg()[0]]      # 1-minute load average, before and after: how busy the machine was
    for rounds in bar(_rounds(seconds), "bench --decode", "generation", enabled=progress):
        _, t0, ts = lockstep_generation(runners, prompt, steps, flip=rounds)
        for k in runners:
            ttft[k].append(t0[k])
            step[k] += ts[k]
    load.append(os.getloadavg()[0])
    ref, cand = _summary(ttft["reference"], step["reference"]), _summary(ttft["candidate"], step["candidate"])
    return {"prompt_len": prompt_len, "steps": steps, "threads": threads, "prompt": source,
            "forms": {k: r.layout.form for k, r in runners.items()},
            "reference": ref, "candidate": cand,
            "ratio": {"ttft": cand["ttft_ms"] / ref["ttft_ms"], "decode": cand["decode_ms"] / ref["decode_ms"]},
            "agree": _agreement(tokens["candidate"], tokens["reference"]), "tokens": tokens,
            "load_average": load}


def format_bench_decode(res: dict) -> str:
    a = res["agree"]
    lines = [(f"decode ({res['threads']} threads): prompt {res['prompt_len']} tokens ({res['prompt']}), "
              f"{res['steps']} greedy steps, {res['reference']['generations']} interleaved generations each"),
             f"  {'':>10} {'TTFT':>11} {'ms/token':>10} {'tokens/s':>9}"]
    for k in ("reference", "candidate"):
        r = res[k]
        lines.append(f"  {k:>10} {r['ttft_ms']:>9.2f}ms {r['decode_ms']:>10.2f} {r['tokens_per_s']:>9.1f}")
    lines.append(f"  {'ratio':>10} {res['ratio']['ttft']:>10.3f}x {res['ratio']['decode']:>9.3f}x")
    lines.append(f"greedy tokens: the first {a['prefix']} of {a['tokens']} agree "
                 f"({a['same']} equal positions)")
    lines.append("load average (1 min) {:.2f} at start, {:.2f} at end".format(*res["load_average"]))
    return "\n".join(lines)
