"""Quantize within an accuracy budget: return the most sensitive linear layers to float.

Budget (on held-out samples, never the calibration ones): KL(FP32 ‖ candidate) ≤ max_kl and/or
perplexity_candidate / perplexity_FP32 − 1 ≤ max_ppl_increase (causal LMs).
  1. calibrate once on the calibration samples; quantize (α searched as configured); measure.
  2. over budget: rank the quantized layers with graphpass.debug on a few calibration samples,
     worst first; F(k) = the same graph with the first k of that order in float, re-quantized
     from the cached stats and the α already chosen (no recalibration, no new search).
  3. the shortest prefix within budget: k = 1, 2, 4, ... until F(k) passes, then bisect between
     the last failing and the first passing k (this assumes the metric falls as k grows); about
     2·log2(k) + 1 evaluations.
Order: by default the SQNR of the layer alone (what floating it removes). The SQNR at a layer's
output also counts every layer before it, so it ranks depth more than the layer: on SmolLM2
(token, budget KL 0.008 from 0.0120) one layer to float by it moved KL to 0.0120, by the layer
alone to 0.0117; the latter met the budget with 25 layers (all down_proj) in float.
The FP32 reference runs once per search (graphpass.evaluate's ref_cache, in the work folder beside
the output): per held-out batch, its logits as float32 on disk, read back a chunk of rows at a time
with plain reads (page cache, not resident memory), and per position what the metrics need of it
besides them: max, log-sum-exp and argmax (graphpass.validate.metrics.RefRows) and the NLL sums.
Why the logits themselves: KL(FP32 ‖ candidate) = Σ_v p_v (log p_v − log q_v) needs the whole
reference distribution at every position. Measured on the 262,144-token synthetic decoder
(4 x 64 tokens): the reference's top-64 or top-1024 alone gave KL wrong by > 100 % (its
distributions are flat); float16 logits moved KL by 7.7e-5 relative (target 1e-6); recomputing
the reference took 1.68 s per evaluation where reading the cache back took 0.15 s, on a body of
one layer (a real model's forward costs far more). The price is disk: samples x sequence x
vocabulary x 4 bytes (4 x 512 tokens x 262,144 = 2 GiB), removed with the work folder.
Unreachable (even F(all) is over budget): the graph closest to the budget is written and a
one-line warning says so; the exit status stays 0, since the graph is valid and the report says
how far it is (a budget is a goal, not a precondition). Raising α instead is not tried: the
per-site α search already picks the α of least error.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from graphpass.errors import GraphpassError

ORDER_NAMES = {"sqnr": "SQNR at the output", "layer": "SQNR of the layer alone"}


@dataclass(frozen=True)
class Budget:
    max_kl: float | None = None
    max_ppl_increase: float | None = None          # a fraction: 0.01 = +1 % perplexity

    def check(self, kind: str) -> None:
        if self.max_kl is None and self.max_ppl_increase is None:
            raise GraphpassError("an accuracy budget needs --max-kl and/or --max-ppl-increase")
        for name, v in (("--max-kl", self.max_kl), ("--max-ppl-increase", self.max_ppl_increase)):
            if v is not None and not (v >= 0 and np.isfinite(v)):
                raise GraphpassError(f"{name} must be a finite number >= 0, got {v}")
        if kind != "causal-lm":
            raise GraphpassError(f"KL and perplexity budgets need a causal LM; this model is an {kind}")

    def excess(self, m: dict) -> float:
        """max over the limits of metric / limit: <= 1 means within budget."""
        parts = []
        if self.max_kl is not None:
            parts.append(m["kl"] / self.max_kl if self.max_kl > 0 else (0.0 if m["kl"] <= 0 else np.inf))
        if self.max_ppl_increase is not None:
            inc = ppl_increase(m)
            lim = self.max_ppl_increase
            parts.append(inc / lim if lim > 0 else (0.0 if inc <= 0 else np.inf))
        return max(parts)

    def met(self, m: dict) -> bool:
        return self.excess(m) <= 1.0

    def describe(self) -> str:
        parts = ([f"KL <= {self.max_kl:g}"] if self.max_kl is not None else []) + \
                ([f"perplexity +{100 * self.max_ppl_increase:g}%"] if self.max_ppl_increase is not None else [])
        return " and ".join(parts)


def ppl_increase(m: dict) -> float:
    return m["perplexity_candidate"] / m["perplexity_reference"] - 1.0


def split_holdout(data: dict[str, np.ndarray], holdout: dict[str, np.ndarray] | None):
    """(calibration, held-out): the given holdout, else the last quarter of `data`."""
    if holdout is not None:
        return data, holdout
    n = len(next(iter(data.values())))
    if n < 2:
        raise GraphpassError(f"--data has {n} sample; hold-out needs 2+ (or pass --holdout HELD.npz)")
    k = max(1, n // 4)
    return {a: v[: n - k] for a, v in data.items()}, {a: v[n - k:] for a, v in data.items()}


def escape(name: str) -> str:
    """An fnmatch pattern matching exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass
class Attempt:
    floats: int                     # length of the prefix kept in float
    kl: float
    ppl_increase: float | None
    met: bool
    seconds: float

    def row(self) -> dict:
        return {"float_layers": self.floats, "kl": self.kl, "ppl_increase": self.ppl_increase,
                "met": self.met, "seconds": self.seconds}


@dataclass
class BudgetResult:
    budget: Budget
    held_out: int                                           # samples
    met: bool = False
    order_by: str = "layer"
    order: list[str] = field(default_factory=list)          # quantized layers, worst first
    labels: dict[str, str] = field(default_factory=dict)    # layer -> module path, for display
    attempts: list[Attempt] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    plain: dict = field(default_factory=dict)               # metrics of the plain quantized graph
    reached: dict = field(default_factory=dict)             # metrics of the graph written
    latency: dict = field(default_factory=dict)             # 1x512: fp32, plain, final (ms)
    size: dict = field(default_factory=dict)                # bytes: fp32, plain, final

    def format(self) -> str:
        a = self.attempts
        lines = [f"budget {self.budget.describe()} on {self.held_out} held-out samples: "
                 + ("met" if self.met else "NOT met") + f" after {len(a)} evaluations"]
        for t in a:
            inc = "" if t.ppl_increase is None else f"   perplexity {100 * t.ppl_increase:+.2f}%"
            lines.append(f"  {t.floats:>4} layers in float: KL {t.kl:.5f}{inc}   "
                         f"{'within' if t.met else 'over'} ({t.seconds:.0f} s)")
        if self.kept_float:
            names = ", ".join(self.labels.get(n, n) for n in self.kept_float)
            lines.append(f"  kept in float ({len(self.kept_float)}, worst {ORDER_NAMES[self.order_by]} first): "
                         + names)
        if self.latency:
            lt = self.latency
            lines.append(f"  latency 1x512 (vs FP32 {lt['fp32_ms']:.1f} ms): plain {lt['plain_ms']:.1f} ms "
                         f"({lt['plain_ratio']:.3f}x), written {lt['final_ms']:.1f} ms ({lt['final_ratio']:.3f}x)")
        if self.size:
            s = self.size
            lines.append(f"  size: FP32 {s['fp32'] / 1e6:.1f} MB, plain {s['plain'] / 1e6:.1f} MB, "
                         f"written {s['final'] / 1e6:.1f} MB")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"budget": {"max_kl": self.budget.max_kl, "max_ppl_increase": self.budget.max_ppl_increase},
                "held_out_samples": self.held_out, "met": self.met, "order_by": self.order_by,
                "kept_float": self.kept_float,
                "kept_float_modules": [self.labels.get(n, n) for n in self.kept_float],
                "attempts": [t.row() for t in self.attempts], "plain": self.plain, "reached": self.reached,
                "latency_1x512": self.latency, "size_bytes": self.size, "order": self.order}


class _Search:
    """Quantized graphs with a prefix of `order` in float, each measured on the held-out data."""

    def __init__(self, model: Path, work: Path, stats, config, held, budget: Budget, res: BudgetResult,
                 log, kv_data=None):
        self.model, self.work, self.stats, self.config = model, work, stats, config
        self.kv_data = kv_data                                # --kv-cache: calibration data for the cache
        self.held, self.budget, self.res, self.log = held, budget, res, log
        self.metrics: dict[int, dict] = {}                    # k -> evaluate() on held-out data

    def quantize(self, k: int, path: Path):
        from graphpass.pipeline import quantize

        cfg = replace(self.config, skip=self.config.skip + tuple(escape(n) for n in self.res.order[:k]))
        return quantize(self.model, path, self.kv_data, cfg, progress=False, log=lambda *_: None, stats=self.stats)

    def measure(self, k: int, path: Path, t0: float) -> bool:
        from graphpass.validate.evaluate import evaluate

        m = evaluate(path, self.model, self.held, threads=self.config.threads, kind="causal-lm",
                     progress=False, ref_cache=self.work / "reference")   # FP32 run once per search
        t = Attempt(k, m["kl"], ppl_increase(m), self.budget.met(m), time.perf_counter() - t0)
        self.res.attempts.append(t)
        self.log(f"budget: {k} layers in float -> KL {t.kl:.5f}, perplexity {100 * t.ppl_increase:+.2f}%: "
                 f"{'within' if t.met else 'over'} budget ({t.seconds:.0f} s)")
        self.metrics[k] = m
        return t.met

    def attempt(self, k: int) -> bool:
        t0 = time.perf_counter()
        path = self.work / f"float{k}.onnx"
        self.quantize(k, path)
        try:
            return self.measure(k, path, t0)
        finally:
            _remove(path)

    def shortest_prefix(self) -> int:
        """Doubling, then bisection: the smallest k within budget, else the k closest to it."""
        n, lo, k = len(self.res.order), 0, 1
        while True:
            k = min(k, n)
            if self.attempt(k):
                break
            lo = k
            if k == n:                                   # unreachable: the closest graph measured
                return min(self.metrics, key=lambda j: (self.budget.excess(self.metrics[j]), j))
            k *= 2
        hi = k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.attempt(mid):
                hi = mid
            else:
                lo = mid
        return hi


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def quantize_within_budget(model: str | os.PathLike, output: str | os.PathLike, data: dict, config,
                           budget: Budget, holdout: dict | None = None, order_by: str = "layer",
                           rank_samples: int = 4, bench_seconds: float = 2.0, progress: bool = True,
                           log=print):
    """(PipelineResult of the graph written, BudgetResult). `config`: a PipelineConfig."""
    from graphpass.calibrate.collect import calibrate
    from graphpass.calibrate.data import check_data
    from graphpass.validate.evaluate import model_kind
    from graphpass.graph.io import load_model
    from graphpass.pipeline import needs_calibration, quantize

    src, out = Path(model), Path(output)
    graph = load_model(src, load_weights=False)
    budget.check(model_kind(src, graph))
    calib, held = split_holdout(data, holdout)
    check_data(held, graph, "held-out data")
    res = BudgetResult(budget, len(next(iter(held.values()))), order_by=order_by)
    t0 = time.perf_counter()
    stats = None
    if needs_calibration(config):
        stats = calibrate(src, calib, config.batch_size, config.threads, progress,
                          row_step=config.row_step if config.alpha == "auto" else 0,
                          decode_steps=config.decode_steps,   # --kv-smooth's statistic in the same runs
                          cache={} if config.kv_cache and config.kv_smooth is not None else None)
        log(f"calibrate: {len(stats.min)} tensors over {stats.samples} samples "
            f"({time.perf_counter() - t0:.1f} s; {res.held_out} samples held out)")
    work = Path(tempfile.mkdtemp(prefix=".graphpass-budget-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        kv_data = calib if config.kv_cache else None          # each graph's int8 cache is calibrated on it
        plain = quantize(src, work / "plain.onnx", kv_data, config, progress, log, stats=stats)
        if stats is not None:
            stats.rows = {}                                  # the alpha search is done
        if config.alpha == "auto":                           # keep the α found: no new search
            config = replace(config, alpha=0.5, site_alpha=tuple(plain.alphas.items()),
                             outlier_thresholds=tuple(plain.thresholds.items()))   # and the thresholds
        s = _Search(src, work, stats, config, held, budget, res, log, kv_data)
        k = 0
        if not s.measure(0, work / "plain.onnx", t0):
            _rank(res, src, work / "plain.onnx", calib, rank_samples, config.threads, log)
            k = s.shortest_prefix()
        res.met = any(t.met and t.floats == k for t in res.attempts)
        res.kept_float, res.plain, res.reached = res.order[:k], s.metrics[0], s.metrics[k]
        if k == 0 and not (work / "plain.onnx.data").exists():
            _costs(res, src, work / "plain.onnx", work / "plain.onnx", bench_seconds, config.threads)
            os.replace(work / "plain.onnx", out)              # checked and saved already
            final = replace(plain, output=out)
        else:
            final = s.quantize(k, out)                        # a fresh, checked, atomic save
            final.alphas = plain.alphas
            _costs(res, src, work / "plain.onnx", out, bench_seconds, config.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final, res


def _rank(res: BudgetResult, src: Path, plain: Path, calib: dict, samples: int, threads: int, log) -> None:
    from graphpass.validate.debug import debug

    t0 = time.perf_counter()
    few = {a: v[:samples] for a, v in calib.items()}
    d = debug(src, plain, few, threads=threads, progress=False, local=res.order_by == "layer")
    ranked = d.ranked(res.order_by)
    res.order = [r.name for r in ranked]
    res.labels = {r.name: r.label for r in d.layers}
    log(f"rank: {len(ranked)} quantized layers by {ORDER_NAMES[res.order_by]} on {len(next(iter(few.values())))} "
        f"calibration samples ({time.perf_counter() - t0:.1f} s); worst: "
        + ", ".join(f"{r.label} {_db(r.sqnr_db if res.order_by == 'sqnr' else r.layer_sqnr_db)}"
                    for r in ranked[:3]))


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} dB"


def _costs(res: BudgetResult, src: Path, plain: Path, final: Path, seconds: float, threads: int) -> None:
    from graphpass.validate.bench import synthetic_inputs, time_pair
    from graphpass.graph.io import input_specs, load_model, model_size
    from graphpass.graph.runtime import make_session

    res.size = {"fp32": model_size(src), "plain": model_size(plain), "final": model_size(final)}
    if seconds <= 0:
        return
    try:
        feeds = synthetic_inputs(input_specs(load_model(src, load_weights=False)), (1, 512))
    except GraphpassError:
        return                                                # inputs bench cannot build
    ref = make_session(src, threads)
    r1, p, _ = time_pair(ref, make_session(plain, threads), feeds, seconds)
    r2, f, _ = time_pair(ref, make_session(final, threads), feeds, seconds)
    res.latency = {"fp32_ms": (r1 + r2) / 2, "plain_ms": p, "plain_ratio": p / r1,
                   "final_ms": f, "final_ratio": f / r2}
