"""Decode speed of with-past graphs against their FP32 reference, measured in one run.

    python tools/bench_decode.py FP32/model.onnx CAND.onnx [CAND2.onnx ...] [--prompt 256]
        [--steps 64] [--rounds 5] [--threads 2] [--tokenizer T/tokenizer.json] [--profile] [--spinning]

One generation = a prefill of P prompt tokens with an empty past (time to first token), then
N greedy steps, each feeding one token and the previous `present.*` back as `past_key_values.*`
(ms/token = median over steps and rounds; also the 10th percentile and the fastest TTFT, the
readings a loaded machine disturbs least, and the process CPU time per decode step, which
waiting for a core does not inflate). Every session runs with 2 intra-op threads and
spinning off. The sessions run in lockstep (every prefill, then step t of every session before
step t + 1 of any, the order rotated per step and per round), so drifts in machine speed hit
all of them alike. Ratios are candidate / reference medians; TTFT is the median over rounds.
The prompt is the first P tokens of Hamlet through `tokenizer.json` (beside the reference, or
--tokenizer); without one, seeded random ids. "agree" counts the greedy tokens that match the
reference's before the first difference.

--spinning: the sessions as onnxruntime builds them by default, whose threads spin between runs
(what a user's generation loop gets). Spinning sessions cannot be interleaved fairly (the idle
one's threads steal the cores, FACTS.md), so each round runs one whole generation per graph, one
graph at a time with a pause between them, the order rotated per round.

--profile: onnxruntime's profiler over decode steps only (the prefill runs in a separate,
unprofiled session), kernel time per op type per step, and how many nodes onnxruntime runs
per step after its own optimizations.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from profile_ops import table  # noqa: E402

from graphpass.graph.io import model_size  # noqa: E402
from graphpass.graph.runtime import Session, make_session, session_options  # noqa: E402

DTYPES = {1: np.float32, 10: np.float16, 7: np.int64, 6: np.int32}


class Decoder:
    """A session over a with-past graph: which inputs it takes and how past maps to present."""

    def __init__(self, path: str, threads: int, profile_dir: str | None = None, spinning: bool = False):
        self.path = path
        self.cpu: list[float] = []      # process CPU seconds of each run (both threads)
        if profile_dir is None:
            self.sess = make_session(path, threads, spinning=spinning)
        else:
            so = session_options(threads, profile=True)
            so.profile_file_prefix = os.path.join(profile_dir, "trace")
            self.sess = Session(path, so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present = {n.replace("past_key_values", "present"): n for n in self.past}
        missing = [p for p in self.present if p not in self.outputs]
        if missing:
            raise SystemExit(f"{path}: no output {missing[0]} for its past input")
        meta = self.inputs[self.past[0]]
        self.kv_shape = [d if isinstance(d, int) else None for d in meta.shape]
        cfg = Path(path).with_name("genai_config.json")
        if self.kv_shape[3] is None and cfg.is_file():     # the builder's int8 / int4 graphs: 'kv_cache_dim'
            dec = json.loads(cfg.read_text())["model"]["decoder"]
            self.kv_shape[1], self.kv_shape[3] = dec["num_key_value_heads"], dec["head_size"]
        self.fdtype = np.float16 if "float16" in meta.type else np.float32

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shp = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(self.kv_shape)]
        return {n: np.zeros(shp, self.fdtype) for n in self.past}

    def feeds(self, ids: np.ndarray, past: dict, past_len: int) -> dict[str, np.ndarray]:
        b, s = ids.shape
        f = {"input_ids": ids, **past}
        if "attention_mask" in self.inputs:
            f["attention_mask"] = np.ones((b, past_len + s), np.int64)
        if "position_ids" in self.inputs:
            f["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64), (b, s)).copy()
        return f

    def step(self, ids: np.ndarray, past: dict, past_len: int) -> tuple[int, dict, float]:
        feeds = self.feeds(ids, past, past_len)
        c, t = time.process_time(), time.perf_counter()
        out = self.sess.run(None, feeds)
        dt = time.perf_counter() - t
        self.cpu.append(time.process_time() - c)
        res = dict(zip(self.outputs, out))
        nxt = int(np.argmax(res["logits"][0, -1]))
        return nxt, {p: res[c] for c, p in self.present.items()}, dt

    def generate(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        """(time to first token s, per-step seconds, generated ids)."""
        ids = prompt[None, :]
        tok, past, ttft = self.step(ids, self.empty_past(1), 0)
        toks, times, n = [tok], [], len(prompt)
        for _ in range(steps):
            tok, past, dt = self.step(np.array([[tok]], np.int64), past, n)
            n += 1
            toks.append(tok)
            times.append(dt)
        return ttft, times, toks


def prompt_ids(reference: str, tokenizer: str | None, n: int) -> tuple[np.ndarray, str]:
    tk = Path(tokenizer) if tokenizer else Path(reference).parent / "tokenizer.json"
    if tk.is_file():
        from graphpass.calibrate.data import play_path, tokenize

        ids = tokenize(play_path("hamlet"), tk)
        return ids[1000:1000 + n].astype(np.int64), f"Hamlet tokens 1000..{1000 + n} ({tk.name})"
    return np.random.default_rng(0).integers(0, 1000, n).astype(np.int64), "seeded random ids"


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def lockstep(decs: list[Decoder], prompt: np.ndarray, steps: int, shift: int):
    """One generation per decoder, interleaved: the prefills one after another, then step t of
    every decoder before step t + 1 of any (order rotated by `shift`), so load drifts on a
    shared machine hit all of them alike."""
    order = [(i + shift) % len(decs) for i in range(len(decs))]
    state = [None] * len(decs)
    ttft, times, toks = [0.0] * len(decs), [[] for _ in decs], [[] for _ in decs]
    for i in order:
        d = decs[i]
        tok, past, ttft[i] = d.step(prompt[None, :], d.empty_past(1), 0)
        state[i], toks[i] = (tok, past), [tok]
        time.sleep(0.05)
    for t in range(steps):
        for i in order[t % len(order):] + order[:t % len(order)]:
            tok, past = state[i]
            tok, past, dt = decs[i].step(np.array([[tok]], np.int64), past, len(prompt) + t)
            state[i] = (tok, past)
            times[i].append(dt)
            toks[i].append(tok)
    return ttft, times, toks


def in_blocks(decs: list[Decoder], prompt: np.ndarray, steps: int, shift: int):
    """One whole generation per decoder, one decoder at a time (order rotated by `shift`), with a
    pause between them: the form for sessions that spin (onnxruntime's default), whose idle
    threads would otherwise slow whichever session runs beside them."""
    ttft, times, toks = [0.0] * len(decs), [[] for _ in decs], [[] for _ in decs]
    for i in [(i + shift) % len(decs) for i in range(len(decs))]:
        time.sleep(0.5)
        ttft[i], times[i], toks[i] = decs[i].generate(prompt, steps)
    return ttft, times, toks


def bench(paths: list[str], prompt: np.ndarray, steps: int, rounds: int, threads: int,
          spinning: bool = False) -> list[dict]:
    decs = [Decoder(p, threads, spinning=spinning) for p in paths]
    for d in decs:                  # warm-up: first runs allocate and pick kernels
        d.generate(prompt[:32], 4)
    ttft = [[] for _ in decs]
    step = [[] for _ in decs]
    toks = [None] * len(decs)
    for d in decs:
        d.cpu.clear()
    for r in range(rounds):
        tt, st, toks = (in_blocks if spinning else lockstep)(decs, prompt, steps, r)
        for i in range(len(decs)):
            ttft[i].append(tt[i])
            step[i] += st[i]
    rows = []
    for i, p in enumerate(paths):
        tt, ms = 1e3 * float(np.median(ttft[i])), 1e3 * float(np.median(step[i]))
        rows.append({"model": p, "nodes": node_count(p), "size_mb": model_size(p) / 1e6,
                     "ttft_ms": tt, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                     "ttft_min_ms": 1e3 * min(ttft[i]), "p10_ms": 1e3 * float(np.percentile(step[i], 10)),
                     "cpu_ms_per_token": 1e3 * float(np.median([c for k, c in enumerate(decs[i].cpu)
                                                                if k % (steps + 1)])),
                     "agree": agree(toks[i], toks[0])})
    for r in rows:     # on a loaded machine the fast tail (min TTFT, 10th percentile step) is the
        r["ttft_ratio"] = r["ttft_ms"] / rows[0]["ttft_ms"]          # least disturbed reading
        r["token_ratio"] = r["ms_per_token"] / rows[0]["ms_per_token"]
        r["ttft_min_ratio"] = r["ttft_min_ms"] / rows[0]["ttft_min_ms"]
        r["p10_ratio"] = r["p10_ms"] / rows[0]["p10_ms"]
        r["cpu_ratio"] = r["cpu_ms_per_token"] / rows[0]["cpu_ms_per_token"]
    return rows


def node_count(path: str) -> int:
    return len(onnx.load(path, load_external_data=False).graph.node)


def profile_decode(path: str, prompt: np.ndarray, steps: int, threads: int) -> tuple[dict, int, float]:
    """Kernel ms per op type per decode step, nodes run per step, wall ms per profiled step."""
    plain = Decoder(path, threads)
    tok, past, _ = plain.step(prompt[None, :], plain.empty_past(1), 0)
    del plain
    with tempfile.TemporaryDirectory() as tmp:
        d = Decoder(path, threads, profile_dir=tmp)
        feeds = d.feeds(np.array([[tok]], np.int64), past, len(prompt))
        for _ in range(2):
            d.sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(steps):
            d.sess.run(None, feeds)
        wall = 1e3 * (time.perf_counter() - t0) / steps
        with open(d.sess.end_profiling()) as f:
            events = json.load(f)
    by_op, nodes, runs = defaultdict(float), set(), steps + 2
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            nodes.add(e["name"])
    return dict(by_op), len(nodes), wall


def header(reference: str, prompt_src: str, a) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}, commit {commit}, {machine()}, load average {os.getloadavg()[0]:.2f}\n"
            f"reference {reference}; prompt {a.prompt} tokens ({prompt_src}), {a.steps} greedy steps, "
            f"{a.rounds} alternating rounds, {a.threads} threads, " +
            ("spinning on (onnxruntime's default), one generation at a time" if a.spinning
             else "spinning off, sessions in lockstep"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference")
    p.add_argument("candidates", nargs="*")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer")
    p.add_argument("--profile", action="store_true", help="per-op profile of decode steps instead")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--spinning", action="store_true",
                   help="sessions as onnxruntime makes them by default (threads spin between runs), "
                        "timed one whole generation at a time instead of in lockstep")
    a = p.parse_args(argv)
    prompt, src = prompt_ids(a.reference, a.tokenizer, a.prompt)
    print(header(a.reference, src, a))
    if a.profile:
        for path in [a.reference, *a.candidates]:
            by_op, n, wall = profile_decode(path, prompt, a.steps, a.threads)
            print(f"\n### {path}: one decode step at past {a.prompt}, {wall:.1f} ms wall (profiled), "
                  f"{n} nodes run by onnxruntime ({node_count(path)} in the file)\n")
            print(table("op type", by_op, 15))
        return 0
    rows = bench([a.reference, *a.candidates], prompt, a.steps, a.rounds, a.threads, a.spinning)
    print("\n| model | nodes | size MB | TTFT ms (median / min) | TTFT ratio (median / min) "
          "| ms/token (median / p10) | ratio (median / p10) | CPU ms/token (ratio) | tokens/s | agree |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['nodes']} | {r['size_mb']:.1f} | {r['ttft_ms']:.0f} / {r['ttft_min_ms']:.0f} "
              f"| {r['ttft_ratio']:.3f}x / {r['ttft_min_ratio']:.3f}x | {r['ms_per_token']:.1f} / {r['p10_ms']:.1f} "
              f"| {r['token_ratio']:.3f}x / {r['p10_ratio']:.3f}x | {r['cpu_ms_per_token']:.1f} ({r['cpu_ratio']:.3f}x) "
              f"| {r['tokens_per_s']:.1f} | {r['agree']}/{a.steps + 1} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
