"""One table: every graphpass W8A8 variant and the onnxruntime.quantization peers on one model.

Usage:
  python tools/bench_quant.py --model DIR/model.onnx --calib CALIB.npz --eval EVAL.npz \
      --out results.md [--json results.json] [--work WORKDIR] [--only NAME ...] [--eval-samples N]

Method, per row, in one run of this tool (rows run one after another, never in parallel):
  1. quantize in a child process under GNU `/usr/bin/time -v`: `python -m graphpass quantize MODEL -o OUT
     --data CALIB --scheme S [--alpha A | --no-smooth] ...`, or onnxruntime's quantize_dynamic /
     quantize_static through tools/_measure.py. Quantize time = the child's wall time (Python
     start-up and model I/O included); peak memory = the child's own max RSS.
  2. accuracy: graphpass.validate.evaluate.evaluate(candidate, FP32, eval data) -> perplexity of the
     candidate, KL(FP32 || candidate) per position, top-1 agreement with FP32.
  3. latency: fresh FP32 and candidate sessions (graphpass.graph.runtime.make_session, 2 threads,
     spinning off), graphpass.validate.bench.time_pair over interleaved blocks at 1x512 and 1x32;
     ratio = median(candidate) / median(FP32).
  4. size = graphpass.graph.io.model_size (external data included) / the FP32 size.
A row that fails at any step keeps what it measured and says `failed: <reason>`; the rest go on.
The Markdown (and JSON) is rewritten after every row, so an interrupted run still leaves a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, run_measured  # noqa: E402

from graphpass.validate.bench import synthetic_inputs, time_pair  # noqa: E402
from graphpass.calibrate.data import check_data, load_data  # noqa: E402
from graphpass.validate.evaluate import evaluate  # noqa: E402
from graphpass.graph.io import input_specs, load_model, model_size  # noqa: E402
from graphpass.graph.runtime import make_session  # noqa: E402

SHAPES = ((1, 512), (1, 32))


@dataclass(frozen=True)
class Row:
    name: str            # for --only
    label: str           # for the table
    args: tuple = ()     # graphpass quantize options; None for a peer / the reference


def rows() -> list[Row]:
    out = [Row("fp32", "FP32 (reference)", None)]
    for scheme in ("static", "dynamic", "token"):
        for tag, args, what in (("none", ("--no-smooth",), "no smoothing"),
                                ("0.5", ("--alpha", "0.5"), "α 0.5"),
                                ("auto", ("--alpha", "auto"), "α auto")):
            out.append(Row(f"gp-{scheme}-{tag}", f"graphpass {scheme}, {what}", ("--scheme", scheme, *args)))
    auto = ("--scheme", "token", "--alpha", "auto")
    out += [Row("gp-token-auto-lmhead-emb8", "graphpass token, α auto, --lm-head --embedding-int8",
                (*auto, "--lm-head", "--embedding-int8")),
            Row("gp-dynamic-auto-lmhead-emb8", "graphpass dynamic, α auto, --lm-head --embedding-int8",
                ("--scheme", "dynamic", "--alpha", "auto", "--lm-head", "--embedding-int8")),
            Row("gp-token-auto-emb8", "graphpass token, α auto, --embedding-int8", (*auto, "--embedding-int8")),
            Row("ort-dynamic", "onnxruntime quantize_dynamic (per-channel, MatMul)", None),
            Row("ort-static", "onnxruntime quantize_static (QDQ, MinMax, per-channel, MatMul)", None)]
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200].replace("|", "/")


def quantize(row: Row, a: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    d = work / row.name
    d.mkdir(parents=True, exist_ok=True)
    out = d / "model.onnx"
    for f in d.glob("model.onnx*"):
        f.unlink()
    if row.args is not None:
        cmd = [sys.executable, "-m", "graphpass", "quantize", a.model, "-o", str(out), "--data", a.calib, *row.args]
    else:
        cmd = [sys.executable, str(Path(__file__).with_name("_measure.py")), row.name, a.model, str(out), a.calib]
    log(f"{row.name}: {' '.join(cmd)}")
    wall, peak = run_measured(cmd, d / "quantize.log")
    log(f"{row.name}: quantized in {wall:.1f} s, peak {peak:.2f} GB")
    return out, {"quantize_s": wall, "peak_gb": peak}


def latency(cand: Path, ref: str, seconds: float, shapes=SHAPES) -> dict:
    specs = input_specs(load_model(ref, load_weights=False))
    ref_sess, cand_sess = make_session(ref, 2), make_session(cand, 2)
    res = {}
    for shape in shapes:
        r, c, n = time_pair(ref_sess, cand_sess, synthetic_inputs(specs, shape), seconds)
        res[f"{shape[0]}x{shape[1]}"] = {"reference_ms": r, "candidate_ms": c, "ratio": c / r, "runs": n}
    return res


def measure(row: Row, a: argparse.Namespace, work: Path, data: dict) -> dict:
    res: dict = {"name": row.name, "label": row.label}
    try:
        cand = Path(a.model)
        if row.name != "fp32":
            cand, q = quantize(row, a, work)
            res.update(q)
        t0 = time.perf_counter()
        ev = evaluate(cand, a.model, data, batch_size=2, threads=2, progress=False)
        res.update(ppl=ev["perplexity_candidate"], ppl_ref=ev["perplexity_reference"], kl=ev["kl"], top1=ev["top1"])
        log(f"{row.name}: perplexity {res['ppl']:.2f}, KL {res['kl']:.4f}, top-1 {res['top1']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
        res["size_ratio"] = model_size(cand) / model_size(a.model)
        gc.collect()
        res["latency"] = latency(cand, a.model, a.seconds)
        log(f"{row.name}: latency " + ", ".join(f"{k} {v['ratio']:.3f}x" for k, v in res["latency"].items()))
    except Exception as e:  # noqa: BLE001 -- a failing row is recorded, the others go on
        res["error"] = one_line(e)
        log(f"{row.name}: failed: {res['error']}")
    gc.collect()
    return res


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: list[dict], a: argparse.Namespace, header: dict, total: float | None) -> str:
    lines = [f"# W8A8 on {Path(header['source']).parent.name}: graphpass vs onnxruntime.quantization", "",
             f"- date: {header['date']}", f"- machine: {header['machine']}",
             f"- model: `{header['source']}` (FP32, {header['fp32_mb']:.1f} MB with external data), "
             f"run from a private copy `{a.model}`",
             f"- data: {header['data']}", f"- graphpass: {header['code']}", "",
             "| method | perplexity | KL vs FP32 | top-1 | latency 1x512 | latency 1x32 | size | "
             "quantize (s) | peak memory (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r.get("latency", {})
        ppl = fmt(r.get("ppl"), ".2f") if "error" not in r else f"failed: {r['error']}"
        lines.append(" | ".join([
            f"| {r['label']}", ppl, fmt(r.get("kl"), ".4f"), fmt(r.get("top1"), ".3f"),
            *(fmt(lat[s]["ratio"], ".3f") + "x" if s in lat else "—" for s in ("1x512", "1x32")),
            fmt(r.get("size_ratio"), ".3f") + ("x" if "size_ratio" in r else ""),
            fmt(r.get("quantize_s"), ".1f"), fmt(r.get("peak_gb"), ".2f")]) + " |")
    refs = {s: [r["latency"][s]["reference_ms"] for r in results if s in r.get("latency", {})]
            for s in ("1x512", "1x32")}
    abs_ms = ", ".join(f"{np.median(v):.1f} ms at {s}" for s, v in refs.items() if v) or "not measured"
    lines += ["", "- Perplexity: next-token perplexity of the candidate on the eval data (the FP32 row is the "
              "reference); KL(FP32 || candidate) and top-1 agreement averaged over every position.",
              f"- Latency: candidate / FP32 median, 2 intra-op threads, spinning off in both sessions, fresh "
              f"sessions per row, interleaved blocks over ~{a.seconds:g} s per shape (graphpass.validate.bench.time_pair). "
              f"FP32 absolute latency (median over all rows' reference timings): {abs_ms}. The FP32 row times "
              f"FP32 against a second FP32 session: its distance from 1.000x is the noise floor. Load average "
              f"(1 min) at start {header['load']:.2f}, at the last row {os.getloadavg()[0]:.2f}.",
              "- Size: model file plus external data, relative to FP32.",
              "- Quantize time: wall time of the quantizing child process (start-up and model I/O included). "
              "Peak memory: that child's maximum resident set size as reported by GNU `/usr/bin/time -v`.",
              "- onnxruntime rows: per_channel=True, weight QInt8, op_types_to_quantize=['MatMul']: quantize_dynamic "
              "takes only MatMuls with a constant weight, quantize_static also activation x activation ones "
              "(attention, a tied LM head); static: QDQ, MinMax, "
              "activation QUInt8, calibrated one sample at a time over the calibration data; no quant_pre_process (onnxruntime only "
              "warns without it)."]
    if total is not None:
        lines.append(f"- Total runtime of this table: {total / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def code_version() -> str:
    """graphpass is edited while benchmarks run: record the commit and the uncommitted files."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "graphpass"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (f", {len(dirty)} uncommitted file(s) under graphpass/ at start" if dirty else "")


def private_copy(model: str, work: Path) -> str:
    """Copy the FP32 model (and its external data, model.json) into the work dir: other processes
    hard-linking the shared data file make onnx refuse to read it ('potential hardlink attack')."""
    import shutil

    import onnx
    from onnx.external_data_helper import _get_all_tensors

    src, dst = Path(model), work / "fp32"
    dst.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src), load_external_data=False)
    locs = {e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"}
    for name in {src.name, "model.json", *locs}:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, dst / name)
    return str(dst / src.name)


def describe(path: str, data: dict, note: str) -> str:
    shape = " x ".join(map(str, next(iter(data.values())).shape))
    return f"`{Path(path).name}` {shape} tokens{f' ({note})' if note else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", required=True, help="Markdown table")
    p.add_argument("--json", help="also write every measurement as JSON")
    p.add_argument("--work", default="bench_quant_work", help="folder for quantized models and logs")
    p.add_argument("--only", nargs="+", metavar="NAME", help="rows to run: " + ", ".join(r.name for r in rows()))
    p.add_argument("--eval-samples", type=int, help="evaluate on the first N eval samples only")
    p.add_argument("--seconds", type=float, default=6.0, help="timing budget per shape per pair")
    p.add_argument("--calib-note", default="", help="e.g. 'Othello'")
    p.add_argument("--eval-note", default="", help="e.g. 'Hamlet'")
    a = p.parse_args(argv)
    chosen = [r for r in rows() if not a.only or r.name in a.only]
    unknown = set(a.only or ()) - {r.name for r in rows()}
    if unknown or not chosen:
        p.error(f"unknown row(s) {sorted(unknown)}; choose from {[r.name for r in rows()]}")
    ref = load_model(a.model, load_weights=False)
    calib, data = load_data(a.calib), load_data(a.eval)
    check_data(calib, ref, a.calib)
    if a.eval_samples:
        data = {k: v[:a.eval_samples] for k, v in data.items()}
    check_data(data, ref, a.eval)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    source, a.model = a.model, private_copy(a.model, work)
    log(f"copied {source} to {a.model}")
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "load": os.getloadavg()[0],
              "code": code_version(),
              "fp32_mb": model_size(a.model) / 1e6, "source": source,
              "data": f"calibration {describe(a.calib, calib, a.calib_note)}; evaluation "
                      f"{describe(a.eval, data, a.eval_note)}"}
    t0, results = time.perf_counter(), []
    for i, row in enumerate(chosen, 1):
        log(f"row {i}/{len(chosen)}: {row.label}")
        results.append(measure(row, a, work, data))
        done = i == len(chosen)
        total = time.perf_counter() - t0
        Path(a.out).write_text(markdown(results, a, header, total if done else None))
        if a.json:
            Path(a.json).write_text(json.dumps({**header, "total_s": total, "rows": results}, indent=2) + "\n")
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
