"""Latency and size of a candidate graph against its reference, measured in one run.

Both sessions are built with spinning off and timed in alternating blocks (reference block,
candidate block, ...) so neither one's idle threads bias the other; the ratio is
median(candidate) / median(reference) per input shape.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np

from graphpass.errors import GraphpassError
from graphpass.graph.decode import conform_empty_past, load_layout
from graphpass.graph.io import InputSpec, input_specs, load_model, model_size, output_names
from graphpass.graph.runtime import fixed_mmap_threshold, make_session
from graphpass.validate.evaluate import OUTPUT_BUDGET, sample_output_bytes
from graphpass.progress import bar


@dataclass(frozen=True)
class Timing:
    shape: tuple[int, int]
    reference_ms: float
    candidate_ms: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.reference_ms


def parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise GraphpassError(f"shape '{text}' is not BATCHxSEQ, e.g. 1x512")
    return int(m.group(1)), int(m.group(2))


def synthetic_inputs(specs: list[InputSpec], shape: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of a [batch, seq] shape: token ids in a small safe range, masks of ones, zeros for types."""
    rng = np.random.default_rng(seed)
    b, s = shape
    out = {}
    for sp in specs:
        if sp.rank != 2:
            raise GraphpassError(f"input '{sp.name}' has rank {sp.rank}; bench builds [batch, seq] inputs only")
        if np.issubdtype(sp.dtype, np.floating):
            out[sp.name] = rng.standard_normal((b, s)).astype(sp.dtype)
        elif "mask" in sp.name:
            out[sp.name] = np.ones((b, s), sp.dtype)
        elif "type" in sp.name:
            out[sp.name] = np.zeros((b, s), sp.dtype)
        elif "position" in sp.name:
            out[sp.name] = np.broadcast_to(np.arange(s, dtype=sp.dtype), (b, s)).copy()
        else:   # ids below 100, and inside the table they index
            out[sp.name] = rng.integers(0, min(100, sp.limit or 100), (b, s)).astype(sp.dtype)
    return out


def _prefill_inputs(specs: list[InputSpec], shape: tuple[int, int], layout) -> dict[str, np.ndarray]:
    """A with-past graph at [batch, seq]: a prefill over an empty past (past axis of length 0)."""
    from graphpass.graph.decode import empty_cache, step_feeds

    ids = synthetic_inputs([s for s in specs if s.name == layout.ids], shape)[layout.ids]
    return step_feeds(layout, empty_cache(layout, shape[0]), ids)


def _time_block(sess, feeds, runs: int = 1, seconds: float = 0.0) -> list[float]:
    """Per-run times of `runs` runs, continued until `seconds` have passed."""
    times = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return times


def time_pair(ref_sess, cand_sess, feeds, seconds: float = 6.0, rounds: int = 5,
              cand_feeds=None) -> tuple[float, float, int]:
    """Median latency (ms) of each session over alternating blocks lasting ~`seconds` in total.

    Blocks are short (0.5 s each, or `seconds / (2 * rounds)` when that is less; at least one
    run) and alternate as often as the budget allows (at least `rounds` times), so drifts in
    machine speed hit both sessions alike. A block is bounded by time, not by a run count
    estimated from a few runs, so a slower-than-estimated graph cannot stretch the budget.
    `cand_feeds`: the candidate's own inputs when they differ in dtype (an int8 KV cache)."""
    cf = feeds if cand_feeds is None else cand_feeds
    _time_block(ref_sess, feeds, 2)  # warm-up: first runs allocate and pick kernels
    _time_block(cand_sess, cf, 2)
    block = min(0.5, seconds / (2 * rounds))
    rounds = max(rounds, int(seconds / (2 * block)))
    pause = min(0.05, block / 4)
    ref_t, cand_t = [], []
    for _ in range(rounds):
        ref_t += _time_block(ref_sess, feeds, seconds=block)
        time.sleep(pause)
        cand_t += _time_block(cand_sess, cf, seconds=block)
        time.sleep(pause)
    return 1e3 * float(np.median(ref_t)), 1e3 * float(np.median(cand_t)), len(ref_t)


def bench(candidate: str | os.PathLike, reference: str | os.PathLike,
          shapes: list[tuple[int, int]], threads: int = 2, seconds: float = 6.0, progress: bool = True) -> dict:
    ref_model = load_model(reference, load_weights=False)
    cand_model = load_model(candidate, load_weights=False)
    specs = input_specs(ref_model)
    cand_names = [s.name for s in input_specs(cand_model)]
    if cand_names != [s.name for s in specs]:
        raise GraphpassError(f"{candidate}: inputs {cand_names} differ from the reference's")
    layout, cand_layout = load_layout(reference, ref_model), load_layout(candidate, cand_model)
    # Outputs over the eval budget (512 x 262k logits: 512 MiB a run) with two sessions alive: each
    # arena would keep its own copy, so both run without one, and freed blocks go back at once.
    n, seq = max(b for b, _ in shapes), max(t for _, t in shapes)
    lean = (sample_output_bytes(ref_model, output_names(ref_model), seq) or 0) * n > OUTPUT_BUDGET
    if lean:
        fixed_mmap_threshold()
    ref_sess, cand_sess = (make_session(m, threads, arena=not lean) for m in (reference, candidate))
    timings = []
    for shape in bar(shapes, "bench", "shape", enabled=progress):
        feeds = _prefill_inputs(specs, shape, layout) if layout else synthetic_inputs(specs, shape)
        # an int8-cache candidate takes its empty past as int8
        r, c, n = time_pair(ref_sess, cand_sess, feeds, seconds, cand_feeds=conform_empty_past(cand_layout, feeds))
        timings.append(Timing(shape, r, c, n))
    ref_size, cand_size = model_size(reference), model_size(candidate)
    return {
        "threads": threads,
        "latency": [{"shape": f"{t.shape[0]}x{t.shape[1]}", "reference_ms": t.reference_ms,
                     "candidate_ms": t.candidate_ms, "ratio": t.ratio, "runs": t.runs} for t in timings],
        "size": {"reference_bytes": ref_size, "candidate_bytes": cand_size, "ratio": cand_size / ref_size},
    }


def format_bench(res: dict) -> str:
    lines = [f"latency ({res['threads']} threads, median of interleaved blocks)",
             f"  {'shape':>8} {'reference':>12} {'candidate':>12} {'ratio':>7} {'runs':>5}"]
    for t in res["latency"]:
        lines.append(f"  {t['shape']:>8} {t['reference_ms']:>10.2f}ms {t['candidate_ms']:>10.2f}ms "
                     f"{t['ratio']:>6.3f}x {t['runs']:>5}")
    s = res["size"]
    lines.append(f"size  reference {s['reference_bytes'] / 1e6:.1f} MB   candidate "
                 f"{s['candidate_bytes'] / 1e6:.1f} MB   ({s['ratio']:.3f}x)")
    return "\n".join(lines)
