"""W4A8 (MatMulNBits accuracy_level 4) with and without smoothing, and how much of its error is the
int8 activation: one table, one run.

Usage:
  python tools/bench_w4a8.py --out w4a8.md [--work DIR]
      [--model SMOLLM2/model.onnx --calib CALIB.npz --eval EVAL.npz --windows 4]
      [--minilm DIR]                       (DIR/model.onnx, DIR/calib.npz, DIR/eval.npz)

Every quantized graph is written once at accuracy_level 4 and evaluated twice: as written, and with
only the attribute set to 0 on every MatMulNBits (passes/nbits.with_accuracy_level: same packed
weights, float activations). With e = KL(FP32 || candidate) (causal LMs) or 1 - cosine of the
output (encoders):
  activation part = e(level 4) - e(level 0)        weight part = e(level 0)
so no smoothing can bring e(level 4) below e(level 0) of its own weights by repairing activations.
Models: the synthetic Llama of graphpass/testing with two outlier channels (S = 300) at width 256,
its rows reading them damped by S^(1/2) (the test fixture's recipe) and by S (massive activations:
an outlier channel weighs as much as a normal one, so int8 activations lose more than 4-bit
weights); MiniLM and SmolLM2 when given. Calibration is run once per model, and its statistics
(with the sampled rows) cached in --work as .npz. SmolLM2 is scored on its first --windows
evaluation windows. The last table puts level 4 on one group of layers at a time (the rest at 0)
on the RTN block-128 SmolLM2 graph: where the activation part comes from.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

SYN_SCALE, SYN_WIDTH, SYN_FFN = 300.0, 256, 512
GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",), "LM head": ("",)}


@dataclass(frozen=True)
class Variant:
    label: str
    block: int = 128
    awq: bool = False
    smooth: bool = False
    head_bits: int | None = None

    @property
    def name(self) -> str:
        return (f"b{self.block}-{'awq' if self.awq else 'rtn'}" + (f"-h{self.head_bits}" if self.head_bits else "")
                + ("-smooth" if self.smooth else ""))


def pairs(block: int, head_bits: int | None = None, awq_too: bool = True) -> list[Variant]:
    """RTN and AWQ + clip, each without and with smoothing (α auto, searched on level 4)."""
    head = f", head {head_bits}-bit" if head_bits else ""
    out = [Variant(f"RTN{head}", block, False, False, head_bits),
           Variant(f"RTN + smoothing{head}", block, False, True, head_bits)]
    if awq_too:
        out += [Variant(f"AWQ + clip{head}", block, True, False, head_bits),
                Variant(f"AWQ + clip + smoothing{head}", block, True, True, head_bits)]
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------- calibration
def cached_stats(model: Path, data: dict, cache: Path, row_step: int, batch: int):
    """Stats with sampled rows: from cache (Stats.save + an .npz of the rows), else calibrated once."""
    from graphpass.calibrate.collect import calibrate
    from graphpass.calibrate.stats import Stats

    rows = cache.with_name(cache.stem + "-rows.npz")
    if cache.exists() and rows.exists():
        st = Stats.load(cache)
        with np.load(rows, allow_pickle=False) as z:
            st.rows = {k: z[k] for k in z.files}
        log(f"{model}: cached calibration {cache}")
        return st
    t0 = cpu_seconds()
    st = calibrate(model, data, batch, 2, False, row_step=row_step, decode_steps=0)
    log(f"{model}: calibrated in {cpu_seconds() - t0:.0f} CPU s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    st.save(cache)
    np.savez(rows, **st.rows)
    return st


# ---------------------------------------------------------------------------- one variant
def error_of(ev: dict) -> float:
    return ev["kl"] if "kl" in ev else 1.0 - ev["cosine_mean"]


def measure(model: Path, stats, data: dict, work: Path, v: Variant) -> dict:
    """Quantize at level 4 (cached stats), then evaluate the graph at level 4 and level 0."""
    import copy

    from graphpass.passes.nbits import NBitsConfig, with_accuracy_level
    from graphpass.pipeline import PipelineConfig, quantize
    from graphpass.validate.evaluate import evaluate

    out = work / v.name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = PipelineConfig(scheme="w4", alpha="auto" if v.smooth else None, awq=v.awq, awq_clip=True, gptq=False,
                         nbits=NBitsConfig(bits=4, block_size=v.block, accuracy_level=4, head_bits=v.head_bits))
    t0 = cpu_seconds()
    quantize(model, out, None, cfg, progress=False, log=lambda *a: None, stats=copy.copy(stats))
    res = {"variant": v, "quantize_cpu": cpu_seconds() - t0}
    for level in (4, 0):
        m = onnx.load(str(out), load_external_data=False)
        with_accuracy_level(m, level)
        p = out.with_name(f"model_level{level}.onnx")      # beside model.onnx.data: same weights
        onnx.save(m, str(p))
        res[level] = evaluate(p, model, data, batch_size=2, threads=2, progress=False, ref_cache=work / "fp32")
    log(f"{model.parent.name} {v.name}: level 4 {error_of(res[4]):.4f}, level 0 {error_of(res[0]):.4f}")
    return res


# ---------------------------------------------------------------------------- models
def synthetic(work: Path, damp: float) -> tuple[Path, dict, dict]:
    from graphpass.graph.io import save_model
    from graphpass.testing.synthetic import SyntheticConfig, build_llama, random_inputs

    m = build_llama(SyntheticConfig(hidden=SYN_WIDTH, heads=4, kv_heads=2, ffn=SYN_FFN, outlier_scale=SYN_SCALE,
                                    outlier_damp=damp))
    path = work / "fp32" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(m, path)
    return path, random_inputs(m, 16, 64, seed=0), random_inputs(m, 8, 64, seed=1)


def run_case(title: str, model: Path, calib: dict, ev: dict, work: Path, variants: list[Variant],
             row_step: int, batch: int) -> list[dict]:
    stats = cached_stats(model, calib, work / "stats.npz", row_step, batch)
    out = []
    for v in variants:
        r = measure(model, stats, ev, work, v)
        r["model"] = title
        out.append(r)
    return out


def groups(model: Path, quantized: Path, ev: dict, work: Path) -> list[tuple[str, int, dict]]:
    """Level 4 on one group of SmolLM2's layers, level 0 on the rest (names from the exporter's scopes)."""
    from graphpass.passes.nbits import with_accuracy_level
    from graphpass.validate.debug_graph import module_path
    from graphpass.validate.evaluate import evaluate

    paths = {n.name: module_path(n) for n in onnx.load(str(model), load_external_data=False).graph.node}

    def kind(node_name: str) -> str:
        path = paths.get(re.sub(r"_Q[48]$", "", node_name), "")
        return next((k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                     if path.endswith(k)), "")

    out = []
    for label, kinds in GROUPS.items():
        m = onnx.load(str(quantized), load_external_data=False)
        with_accuracy_level(m, 0)
        n = with_accuracy_level(m, 4, only=lambda name: kind(name) in kinds)
        p = quantized.with_name(f"model_only_{re.sub(r'[^a-z]', '_', label.lower())}.onnx")
        onnx.save(m, str(p))
        out.append((label, n, evaluate(p, model, ev, batch_size=2, threads=2, progress=False, ref_cache=work / "fp32")))
        log(f"level 4 only on {label} ({n} layers): KL {out[-1][2]['kl']:.4f}")
    return out


# ---------------------------------------------------------------------------- table
def markdown(results: list[dict], grouped: list, header: list[str]) -> str:
    lines = header + ["", "| model | weights (symmetric 4-bit) | block | e level 4 | e level 0 (same weights) | "
                      "activation part | its share | top-1 / worst cosine, level 4 | quantize (CPU s) |",
                      "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, e4, e0 = r["variant"], error_of(r[4]), error_of(r[0])
        extra = f"{r[4]['top1']:.3f}" if "top1" in r[4] else f"{r[4]['cosine_min']:.4f}"
        lines.append(f"| {r['model']} | {v.label} | {v.block} | {e4:.4f} | {e0:.4f} | {e4 - e0:+.4f} | "
                     f"{(e4 - e0) / e4:.1%} | {extra} | {r['quantize_cpu']:.1f} |")
    lines += ["", "Smoothing's factor at level 4, e(level 4, no smoothing) / e(level 4, smoothing), and the best "
              "any repair of the activations alone could reach, e(level 4) / e(level 0), without smoothing:", "",
              "| model | weights | block | smoothing's factor | activation-only bound | 2x bar |",
              "|---|---|---|---|---|---|"]
    by = {(r["model"], r["variant"].name): r for r in results}
    for r in results:
        v = r["variant"]
        if v.smooth or (r["model"], v.name + "-smooth") not in by:
            continue
        s = by[(r["model"], v.name + "-smooth")]
        f = error_of(r[4]) / error_of(s[4])
        lines.append(f"| {r['model']} | {v.label} | {v.block} | {f:.2f}x | {error_of(r[4]) / error_of(r[0]):.3f}x | "
                     f"{'met' if f >= 2 else 'missed'} |")
    if grouped:
        lines += ["", "SmolLM2, RTN block 128 (4-bit head), level 4 on one group of layers, level 0 on the rest:", "",
                  "| level 4 on | layers | KL | KL minus all-level-0 |", "|---|---|---|---|"]
        base = next(error_of(r[0]) for r in results
                    if r["model"].startswith("SmolLM2") and r["variant"].name == "b128-rtn")
        lines += [f"| {label} | {n} | {ev['kl']:.4f} | {ev['kl'] - base:+.4f} |" for label, n, ev in grouped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from graphpass.calibrate.data import load_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="bench_w4a8_work")
    ap.add_argument("--model", help="SmolLM2 no-cache model.onnx")
    ap.add_argument("--calib")
    ap.add_argument("--eval")
    ap.add_argument("--windows", type=int, default=4, help="SmolLM2 evaluation windows scored")
    ap.add_argument("--minilm", help="folder with model.onnx, calib.npz, eval.npz")
    a = ap.parse_args(argv)
    work, t0, c0 = Path(a.work), time.time(), cpu_seconds()
    results, grouped = [], []
    for damp in (0.5, 1.0):
        title = f"synthetic Llama, S 300, rows / S^{damp:g}"
        path, calib, ev = synthetic(work / f"synthetic_d{damp:g}", damp)
        results += run_case(title, path, calib, ev, path.parent.parent, pairs(32) + pairs(128), 4, 4)
    if a.minilm:
        d = Path(a.minilm)
        results += run_case("MiniLM-L6", d / "model.onnx", load_data(d / "calib.npz"), load_data(d / "eval.npz"),
                            work / "minilm", pairs(128) + pairs(32), 8, 4)
    if a.model:
        ev = {k: v[:a.windows] for k, v in load_data(a.eval).items()}
        variants = pairs(128, awq_too=False) + pairs(128, 8) + pairs(32, 8)
        results += run_case(f"SmolLM2 ({a.windows} windows)", Path(a.model), load_data(a.calib), ev,
                            work / "smollm2", variants, 64, 1)
        grouped = groups(Path(a.model), work / "smollm2" / "b128-rtn" / "model.onnx", ev, work / "smollm2")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = [f"# W4A8: accuracy_level 4 with and without smoothing ({when})",
              "", f"- machine: {machine()}",
              f"- load (1 min) at the end: {os.getloadavg()[0]:.1f}; run {time.time() - t0:.0f} s wall, "
              f"{cpu_seconds() - c0:.0f} CPU s (this process)",
              "- e: KL(FP32 || candidate) for the decoders, 1 - mean cosine for MiniLM"]
    text = markdown(results, grouped, header)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
