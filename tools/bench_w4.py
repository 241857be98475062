"""One table: graphpass weight-only w4 / w8 (RTN, AWQ, AWQ + clip, smoothing, levels, blocks) beside
graphpass W8A8 and onnxruntime's MatMulNBitsQuantizer peers (RTN, HQQ, GPTQ, k_quant) on one model.

Usage:
  python tools/bench_w4.py --model DIR/model.onnx --calib CALIB.npz --eval EVAL.npz --out results.md \
      [--json results.json] [--work WORKDIR] [--only NAME ...] [--seconds S]
  python tools/bench_w4.py --peer NAME MODEL OUT CALIB      (one peer, run as the measured child)

Method per row, as tools/bench_quant.py (rows one after another): quantize in a child process under
GNU `/usr/bin/time -v` (wall time, the child's max RSS); perplexity, KL(FP32 || candidate) and top-1
agreement with graphpass.validate.evaluate; prefill latency at 1x512 as candidate / FP32 median over
interleaved blocks with spinning off (graphpass.validate.bench.time_pair); size with external data.
Decode ms/token and the onnxruntime-genai int4 build are measured by tools/bench_decode.py /
tools/bench_genai.py on the KV-cache forms, not here (column left as —).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import NpzReader, cpu_seconds, machine, run_measured  # noqa: E402
import bench_quant  # noqa: E402
from bench_quant import Row, code_version, describe, fmt, log, one_line, private_copy  # noqa: E402

PEERS = {"ort-rtn-b128": "onnxruntime MatMulNBitsQuantizer default (RTN, block 128, asymmetric)",
         "ort-rtn-b128-sym": "onnxruntime MatMulNBitsQuantizer RTN, block 128, symmetric",
         "ort-rtn-b32": "onnxruntime MatMulNBitsQuantizer default (RTN, block 32, asymmetric)",
         "ort-hqq-b128": "onnxruntime HQQ, block 128 (asymmetric, float zero points)",
         "ort-gptq-b128": "onnxruntime GPTQ, block 128 (8 calibration samples)",
         "ort-kquant": "onnxruntime k_quant"}
GPTQ_SAMPLES = 8
KEEP_8BIT = (30, 50)      # --w4-keep-8bit rows


def rows() -> list[Row]:
    w4 = lambda b, lvl: ("--scheme", "w4", "--block-size", str(b), "--accuracy-level", str(lvl))  # noqa: E731
    out = [Row("fp32", "FP32 (reference)", None)]
    for b in (128, 32):
        for lvl in (4, 0):
            out += [Row(f"w4-rtn-b{b}-l{lvl}", f"graphpass w4 RTN, block {b}, level {lvl}",
                        (*w4(b, lvl), "--no-smooth", "--no-awq")),
                    Row(f"w4-awq-b{b}-l{lvl}", f"graphpass w4 AWQ + clip, block {b}, level {lvl}",
                        (*w4(b, lvl), "--no-smooth", "--no-gptq"))]
    out += [Row("w4-awq-noclip-b128-l4", "graphpass w4 AWQ (no clip), block 128, level 4",
                (*w4(128, 4), "--no-smooth", "--no-clip", "--no-gptq")),
            Row("w4-smooth-b128-l4", "graphpass w4 RTN + smoothing (α auto), block 128, level 4",
                (*w4(128, 4), "--no-awq")),
            Row("w4-awq-smooth-b128-l4", "graphpass w4 AWQ + clip + smoothing, block 128, level 4",
                (*w4(128, 4), "--no-gptq")),
            Row("w4-smooth-b128-l0", "graphpass w4 RTN + smoothing (α auto), block 128, level 0",
                (*w4(128, 0), "--no-awq")),
            Row("w4-rtn-fh-b128-l4", "graphpass w4 RTN, block 128, level 4, --float-head",
                (*w4(128, 4), "--no-smooth", "--no-awq", "--float-head")),
            Row("w4-awq-fh-b128-l4", "graphpass w4 AWQ + clip, block 128, level 4, --float-head",
                (*w4(128, 4), "--no-smooth", "--float-head", "--no-gptq")),
            Row("w4-awq-h8-b128-l4", "graphpass w4 AWQ + clip, block 128, level 4, --head-bits 8",
                (*w4(128, 4), "--no-smooth", "--head-bits", "8", "--no-gptq")),
            Row("w4-gptq-h8-b128-l4", "graphpass w4 AWQ + clip + GPTQ (act-order, λ 0.1), block 128, level 4, "
                "--head-bits 8", (*w4(128, 4), "--no-smooth", "--head-bits", "8", "--gptq")),
            *(Row(f"w4-gptq-h8-k{k}-b128-l4", f"graphpass w4 AWQ + clip + GPTQ (act-order, λ 0.1), block 128, level 4, "
                  f"--head-bits 8, --w4-keep-8bit {k}",
                  (*w4(128, 4), "--no-smooth", "--head-bits", "8", "--gptq", "--w4-keep-8bit", str(k)))
              for k in KEEP_8BIT),
            Row("w4-gptq-h8b64-k57-b128-l4", "graphpass w4 AWQ + clip + GPTQ (act-order, λ 0.1), block 128, level 4, "
                "--head-bits 8 --head-block-size 64, --w4-keep-8bit 57",
                (*w4(128, 4), "--no-smooth", "--head-bits", "8", "--head-block-size", "64", "--gptq",
                 "--w4-keep-8bit", "57")),
            Row("w4-gptq-nat-h8-k50-b128-l4", "graphpass w4 AWQ + clip + GPTQ (natural order, λ 0.01), block 128, "
                "level 4, --head-bits 8, --w4-keep-8bit 50",
                (*w4(128, 4), "--no-smooth", "--head-bits", "8", "--gptq", "--gptq-order", "natural",
                 "--gptq-damp", "0.01", "--w4-keep-8bit", "50")),
            Row("w8-rtn-b32", "graphpass w8 RTN, block 32, level 4", ("--scheme", "w8", "--no-smooth", "--no-awq")),
            Row("w8-awq-b32", "graphpass w8 AWQ + clip, block 32, level 4", ("--scheme", "w8", "--no-smooth")),
            Row("token-auto", "graphpass W8A8 token, α auto", ("--scheme", "token", "--alpha", "auto"))]
    out += [Row(name, label, None) for name, label in PEERS.items()]
    return out


def run_peer(kind: str, model: str, out: str, calib: str) -> None:
    """One MatMulNBitsQuantizer peer on the same FP32 graph (its own defaults unless the row says)."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    m = onnx.load(model)
    if kind.startswith("ort-rtn"):
        q = mq.MatMulNBitsQuantizer(m, block_size=32 if kind.endswith("b32") else 128,
                                    is_symmetric=kind.endswith("sym"))
    elif kind == "ort-hqq-b128":
        q = mq.MatMulNBitsQuantizer(m, algo_config=mq.HQQWeightOnlyQuantConfig(block_size=128))
    elif kind == "ort-gptq-b128":
        reader = type("Reader", (NpzReader, mq.CalibrationDataReader), {})(calib)
        reader.n = min(reader.n, GPTQ_SAMPLES)
        q = mq.MatMulNBitsQuantizer(m, algo_config=mq.GPTQWeightOnlyQuantConfig(reader, block_size=128))
    else:
        q = mq.MatMulNBitsQuantizer(m, algo_config=mq.KQuantWeightOnlyQuantConfig())
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=True)


def quantize(row: Row, a, work: Path) -> tuple[Path, dict]:
    """graphpass rows as tools/bench_quant.py runs them; a peer as `bench_w4.py --peer` in a child."""
    if row.args is not None:
        return bench_quant.quantize(row, a, work)
    out = work / row.name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--peer", row.name, a.model, str(out), a.calib]
    log(f"{row.name}: {' '.join(cmd)}")
    wall, peak = run_measured(cmd, out.parent / "quantize.log")
    log(f"{row.name}: quantized in {wall:.1f} s, peak {peak:.2f} GB")
    return out, {"quantize_s": wall, "peak_gb": peak}


def measure(row: Row, a, work: Path, data: dict) -> dict:
    from graphpass.graph.io import input_specs, load_model, model_size
    from graphpass.graph.runtime import make_session
    from graphpass.validate.bench import synthetic_inputs, time_pair
    from graphpass.validate.evaluate import evaluate

    res: dict = {"name": row.name, "label": row.label, "load_start": os.getloadavg()[0]}
    try:
        cand = Path(a.model)
        if row.name != "fp32":
            cand, q = quantize(row, a, work)
            res.update(q, quantize_cpu_s=cpu_seconds(cand.parent / "quantize.log"))
        ev = evaluate(cand, a.model, data, batch_size=2, threads=2, progress=False,
                      ref_cache=work / "fp32_outputs")      # FP32 logits computed once per run
        res.update(ppl=ev["perplexity_candidate"], kl=ev["kl"], top1=ev["top1"])
        log(f"{row.name}: perplexity {res['ppl']:.2f}, KL {res['kl']:.4f}, top-1 {res['top1']:.3f}")
        res["size_ratio"] = model_size(cand) / model_size(a.model)
        res["size_mb"] = model_size(cand) / 1e6
        gc.collect()
        specs = input_specs(load_model(a.model, load_weights=False))
        r, c, n = time_pair(make_session(a.model, 2), make_session(cand, 2), synthetic_inputs(specs, (1, 512)),
                            a.seconds)
        res["latency"] = {"reference_ms": r, "candidate_ms": c, "ratio": c / r, "runs": n}
        log(f"{row.name}: prefill 1x512 {c / r:.3f}x FP32")
    except Exception as e:  # noqa: BLE001 -- a failing row is recorded, the others go on
        res["error"] = one_line(e)
        log(f"{row.name}: failed: {res['error']}")
    res["load_end"] = os.getloadavg()[0]
    gc.collect()
    return res


def markdown(results: list[dict], header: dict, total: float | None) -> str:
    lines = [f"# Weight-only 4 / 8 bits on {Path(header['source']).parent.name}", "",
             f"- date: {header['date']}", f"- machine: {header['machine']}",
             f"- model: `{header['source']}` (FP32, {header['fp32_mb']:.1f} MB with external data)",
             f"- data: {header['data']}", f"- graphpass: {header['code']}", "",
             "| method | perplexity | KL vs FP32 | top-1 | size | prefill 1x512 | decode ms/token | quantize: wall s / CPU s | "
             "peak memory (GB) | load (1 min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ppl = fmt(r.get("ppl"), ".2f") if "error" not in r else f"failed: {r['error']}"
        lat = r.get("latency")
        lines.append(" | ".join([
            f"| {r['label']}", ppl, fmt(r.get("kl"), ".4f"), fmt(r.get("top1"), ".3f"),
            (f"{r['size_ratio']:.3f}x ({r['size_mb']:.0f} MB)" if "size_ratio" in r else "—"),
            fmt(lat["ratio"], ".3f") + "x" if lat else "—", "—",
            f"{fmt(r.get('quantize_s'), '.1f')} / {fmt(r.get('quantize_cpu_s'), '.1f')}", fmt(r.get("peak_gb"), ".2f"),
            f"{r['load_start']:.1f}–{r['load_end']:.1f}"]) + " |")
    lines += ["", "- Perplexity / KL(FP32 || candidate) / top-1 agreement over every position of the eval data.",
              "- Prefill: candidate / FP32 median at 1x512, 2 threads, spinning off, interleaved blocks; under "
              "the load shown (the machine is shared), so ratios, not absolute times.",
              "- Quantize time: the child's wall time and user + system CPU seconds (start-up, calibration and I/O "
              "included); peak memory: its max RSS (GNU time). Decode ms/token: measured on the KV-cache forms by "
              "another tool (not here).",
              f"- GPTQ is given the first {GPTQ_SAMPLES} calibration samples (it holds every MatMul's inputs).",
              "- Grid trap: SmolLM2's weights are dequantized Q4_1 (asymmetric, blocks of 32); asymmetric "
              "block-32 rows look near-lossless for that reason alone. Judge at block 128, symmetric."]
    if total is not None:
        lines.append(f"- Total runtime: {total / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--peer":
        run_peer(*argv[1:5])
        return 0
    from graphpass.calibrate.data import load_data
    from graphpass.graph.io import model_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    p.add_argument("--work", default="bench_w4_work")
    p.add_argument("--only", nargs="+", metavar="NAME", help="rows: " + ", ".join(r.name for r in rows()))
    p.add_argument("--seconds", type=float, default=6.0)
    a = p.parse_args(argv)
    chosen = [r for r in rows() if not a.only or r.name in a.only]
    chosen.sort(key=lambda r: a.only.index(r.name) if a.only else 0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, data = load_data(a.calib), load_data(a.eval)
    source, a.model = a.model, private_copy(a.model, work)
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "code": code_version(),
              "fp32_mb": model_size(a.model) / 1e6, "source": source,
              "data": f"calibration {describe(a.calib, calib, '')}; evaluation {describe(a.eval, data, '')}"}
    t0, results = time.perf_counter(), []
    for i, row in enumerate(chosen, 1):
        log(f"row {i}/{len(chosen)}: {row.label}")
        results.append(measure(row, a, work, data))
        total = time.perf_counter() - t0
        Path(a.out).write_text(markdown(results, header, total if i == len(chosen) else None))
        if a.json:
            Path(a.json).write_text(json.dumps({**header, "total_s": total, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
