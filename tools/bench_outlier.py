"""The outlier scheme's honest cost: token, token+smoothing, outlier, outlier+smoothing in one run.

Usage:
  python tools/bench_outlier.py --model DIR/model.onnx --calib CALIB.npz --eval EVAL.npz \
      --out results.md [--json results.json] [--work WORKDIR] [--extra NAME=OPTIONS ...]
  python tools/bench_outlier.py --forms [--outliers 6]     (the split's node forms on one GEMM)

Method (one process, rows one after another):
  1. calibrate once (graphpass.calibrate.collect.calibrate, every 64th token's row kept for the
     searches); every row is graphpass.pipeline.quantize with those stats (`--alpha auto` for the
     smoothing rows: α searched per site; for outlier+smoothing α and threshold together).
  2. accuracy: graphpass.validate.evaluate against FP32 (perplexity, KL(FP32 || candidate)).
  3. latency: each row against FP32 (interleaved blocks, spinning off, 2 threads) at 1x512 and
     1x1 (one token, no cache: the decode-ish shape); each outlier row also directly against its
     token row (same smoothing), which is the target's ratio.
  4. float share: input columns on the float path / input columns of the quantized layers.
--forms times one 512x576x1536 linear layer (and 1x576) in each exact form of the split against
the plain token form: mask (X ⊙ m into int8, Gather of O into a float MatMul, Add), Where for
the mask, Gemm with the int8 part as C, and Gather of R (sliced weights).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402
from bench_quant import code_version, describe, latency, log, one_line, private_copy  # noqa: E402

from graphpass.calibrate.data import check_data, load_data  # noqa: E402
from graphpass.graph.io import load_model  # noqa: E402
from graphpass.passes.outlier import OutlierConfig  # noqa: E402
from graphpass.pipeline import PipelineConfig, quantize  # noqa: E402
from graphpass.validate.evaluate import evaluate  # noqa: E402

SHAPES = ((1, 512), (1, 1))
ROWS = {"token": ("token", None, {}), "token+smoothing": ("token", "auto", {}),
        "outlier": ("outlier", None, {}), "outlier+smoothing": ("outlier", "auto", {})}
PAIRED = {"outlier": "token", "outlier+smoothing": "token+smoothing"}


def _extra(text: str) -> tuple[str, tuple]:
    """NAME=scheme,alpha[,key=value...] e.g. 'outlier+smoothing top1%=outlier,auto,fraction=0.01'
    (two_digit=glu+attn or two_digit=none for OutlierConfig.two_digit)."""
    name, _, spec = text.partition("=")
    scheme, alpha, *kv = spec.split(",")
    parse = {"topk": int, "two_digit": lambda v: tuple(k for k in v.split("+") if k != "none")}
    opts = {k: parse.get(k, float)(v) for k, v in (x.split("=") for x in kv)}
    return name, (scheme, None if alpha == "none" else (alpha if alpha == "auto" else float(alpha)), opts)


def _latency(ref: str, cand: Path, seconds: float) -> dict:
    out = latency(cand, ref, seconds, SHAPES)
    gc.collect()
    return out


def run_rows(a, rows: dict, work: Path, data: dict) -> list[dict]:
    from graphpass.calibrate.collect import calibrate

    t0 = time.perf_counter()
    stats = calibrate(a.model, load_data(a.calib), 1, 2, progress=False, row_step=64)
    log(f"calibrated {len(stats.min)} tensors in {time.perf_counter() - t0:.0f} s")
    results, paths = [], {}
    for name, (scheme, alpha, opts) in rows.items():
        res = {"name": name}
        try:
            out = work / name.replace("+", "_").replace(" ", "_").replace("%", "pct") / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            cfg = PipelineConfig(scheme=scheme, alpha=alpha, **({"outlier": OutlierConfig(**opts)} if opts else {}))
            t1 = time.perf_counter()
            q = quantize(a.model, out, None, cfg, progress=False, log=lambda s: None, stats=stats)
            res["quantize_s"] = time.perf_counter() - t1
            res["float_share"] = getattr(q.quant, "float_share", 0.0)
            paths[name] = out
            ev = evaluate(out, a.model, data, batch_size=2, threads=2, progress=False, ref_cache=work / "ref")
            res.update(ppl=ev["perplexity_candidate"], ppl_ref=ev["perplexity_reference"], kl=ev["kl"])
            res["latency"] = _latency(a.model, out, a.seconds)
            if name in PAIRED and PAIRED[name] in paths:
                res["vs_token"] = _latency(str(paths[PAIRED[name]]), out, a.seconds)
            log(f"{name}: ppl {res['ppl']:.3f} KL {res['kl']:.5f} share {res['float_share']:.4f} "
                + " ".join(f"{k} {v['ratio']:.3f}x" for k, v in res["latency"].items())
                + (f" vs token {res['vs_token']['1x512']['ratio']:.3f}x" if "vs_token" in res else ""))
        except Exception as e:  # noqa: BLE001 -- a failing row is recorded, the others go on
            res["error"] = one_line(e)
            log(f"{name}: failed: {res['error']}")
        results.append(res)
        gc.collect()
    return results


def markdown(results: list[dict], header: dict) -> str:
    f = lambda v, s: "—" if v is None else format(v, s)   # noqa: E731
    lines = [f"# Outlier scheme on {header['source']}", "", f"- date: {header['date']}",
             f"- machine: {header['machine']}; load average (1 min) {header['load']:.2f} at start, "
             f"{header['load_end']:.2f} at the end (under load: ratios, not absolute times)",
             f"- data: {header['data']}", f"- graphpass: {header['code']}", "",
             "| row | perplexity | KL vs FP32 | 1x512 vs FP32 | 1x1 vs FP32 | 1x512 vs token | 1x1 vs token | "
             "float columns |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat, vt = r.get("latency", {}), r.get("vs_token", {})
        ratio = lambda d, s: f(d[s]["ratio"], ".3f") + "x" if s in d else "—"   # noqa: E731
        lines.append(" | ".join([f"| {r['name']}", f(r.get("ppl"), ".3f") if "error" not in r else
                                 f"failed: {r['error']}", f(r.get("kl"), ".5f"), ratio(lat, "1x512"),
                                 ratio(lat, "1x1"), ratio(vt, "1x512"), ratio(vt, "1x1"),
                                 f(100 * r["float_share"], ".3f") + "%" if "float_share" in r else "—"]) + " |")
    ref = next((r["ppl_ref"] for r in results if "ppl_ref" in r), None)
    lines += ["", f"- FP32 perplexity {f(ref, '.3f')}. 'vs token': the outlier row timed directly against the "
              "token row with the same smoothing (interleaved blocks in one run).",
              "- float columns: input columns on the float path / input columns of every quantized layer."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--calib")
    p.add_argument("--eval")
    p.add_argument("--out")
    p.add_argument("--json")
    p.add_argument("--work", default="bench_outlier_work")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--only", nargs="+", choices=list(ROWS))
    p.add_argument("--extra", action="append", default=[], metavar="NAME=SCHEME,ALPHA[,KEY=VALUE]")
    p.add_argument("--forms", action="store_true", help="time the split's node forms on one linear layer")
    p.add_argument("--outliers", type=int, default=6, help="--forms: outlier columns of 576")
    a = p.parse_args(argv)
    if a.forms:
        from bench_outlier_forms import print_forms
        print_forms(a.outliers)
        return 0
    if not (a.model and a.calib and a.eval and a.out):
        p.error("--model, --calib, --eval and --out are needed (or --forms)")
    rows = {k: v for k, v in ROWS.items() if not a.only or k in a.only}
    rows.update(dict(map(_extra, a.extra)))
    data = load_data(a.eval)
    check_data(data, load_model(a.model, load_weights=False), a.eval)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    source, a.model = a.model, private_copy(a.model, work)
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "load": os.getloadavg()[0],
              "code": code_version(), "source": source,
              "data": f"calibration {describe(a.calib, load_data(a.calib), '')}; evaluation {describe(a.eval, data, '')}"}
    results = run_rows(a, rows, work, data)
    header["load_end"] = os.getloadavg()[0]
    Path(a.out).write_text(markdown(results, header))
    if a.json:
        Path(a.json).write_text(json.dumps({**header, "rows": results}, indent=2) + "\n")
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
