"""The README decode table in one run: SmolLM2 with a KV cache, every form and peer, accuracy and speed.

    python tools/decode_table.py --work DIR [--rounds 4] [--og-rounds 2] [--skip-accuracy] [--skip-genai]

Graphs (built into --work, reused when a row's folder already holds its model):
  optimum form (models/smollm2_optimum.py), plain onnxruntime:
    fp32          the export itself
    token         graphpass quantize --scheme token --decode-fusions  (alpha auto)
    token_head    ... --lm-head --embedding-int8 --decode-fusions
    route         ... --lm-head --embedding-int8 --decode-fusions --decode-route
    token_emb / route_emb   ... --embedding-int8 --decode-fusions [--decode-route]  (float head)
    w8 / w4 / w4_b32   --scheme w8|w4 [--block-size 32] --no-smooth --decode-fusions  (RTN)
    ort_dynamic   onnxruntime quantize_dynamic (per-channel, MatMul)
  genai form (models/smollm2_genai.py), also timed in plain onnxruntime beside the optimum rows,
  and in the onnxruntime-genai runtime against the genai FP32 folder:
    genai_int8 / genai_int4   onnxruntime-genai's builder -p int8|int4 -e cpu (from a transformers
                              folder written from the GGUF checkpoint, models/_export.smollm2_hf)
    gp_w8 / gp_w4 / gp_w4_b32  graphpass quantize --scheme w8 --block-size 64 | w4 [--block-size 32] --no-smooth
The three token rows share one calibration and one alpha search (the head options do not change
any smoothing site), so they differ only in what their flags say.
Accuracy: graphpass eval over Hamlet 16 x 512 (prefill over an empty past) against the form's FP32.
Speed: tools/bench_decode.py's lockstep (prompt 256 Hamlet tokens, 64 greedy steps, 2 threads,
spinning off) and tools/bench_genai.py's runtime timing; ratios against the FP32 of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MODELS = Path("/work/models")
TOKEN = ["--scheme", "token", "--decode-fusions"]
HEAD = ["--lm-head", "--embedding-int8"]
OPTIMUM = {"token": TOKEN, "token_head": TOKEN + HEAD, "route": TOKEN + HEAD + ["--decode-route"],
           "token_emb": TOKEN + ["--embedding-int8"], "route_emb": TOKEN + ["--embedding-int8", "--decode-route"],
           "w8": ["--scheme", "w8", "--no-smooth", "--decode-fusions"],
           "w4": ["--scheme", "w4", "--no-smooth", "--decode-fusions"],
           "w4_b32": ["--scheme", "w4", "--block-size", "32", "--no-smooth", "--decode-fusions"]}
GENAI = {"gp_w8": ["--scheme", "w8", "--block-size", "64", "--no-smooth"],
         "gp_w4": ["--scheme", "w4", "--no-smooth"],
         "gp_w4_b32": ["--scheme", "w4", "--block-size", "32", "--no-smooth"]}
LABEL = {"fp32": "FP32 (reference)", "token": "graphpass token, α auto, `--decode-fusions`",
         "token_head": "graphpass token, α auto, `--lm-head --embedding-int8 --decode-fusions`",
         "route": "**graphpass token, α auto, `--lm-head --embedding-int8 --decode-fusions --decode-route`**",
         "token_emb": "graphpass token, α auto, `--embedding-int8 --decode-fusions` (float head over the int8 table)",
         "route_emb": "**the same + `--decode-route`**",
         "w8": "graphpass w8 RTN, block 32, `--decode-fusions`", "w4": "graphpass w4 RTN, block 128, `--decode-fusions`",
         "w4_b32": "graphpass w4 RTN, block 32, `--decode-fusions`",
         "ort_dynamic": "onnxruntime quantize_dynamic (per-channel, MatMul)",
         "genai_fp32": "genai FP32 (reference)", "genai_int8": "onnxruntime-genai int8 build (`-p int8`)",
         "genai_int4": "onnxruntime-genai int4 build (`-p int4`, RTN block 32)",
         "gp_w8": "graphpass w8 RTN, block 64", "gp_w4": "graphpass w4 RTN, block 128",
         "gp_w4_b32": "graphpass w4 RTN, block 32"}


def _quantize(src: Path, out: Path, flags: list[str], data: Path, token_alphas: dict) -> None:
    """One graphpass row; token rows after the first reuse its stats and per-site alphas."""
    from graphpass.calibrate.data import load_data
    from graphpass.pipeline import PipelineConfig, quantize

    if flags[1] != "token":
        cmd = [sys.executable, "-m", "graphpass", "quantize", str(src), "-o", str(out / "model.onnx"), *flags]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        return
    cfg = dict(scheme="token", decode_fusions=True, lm_head="--lm-head" in flags,
               embedding_int8="--embedding-int8" in flags, decode_route="--decode-route" in flags)
    data_ = load_data(str(data))
    if "stats" not in token_alphas:
        from graphpass.calibrate.collect import calibrate

        token_alphas["stats"] = calibrate(src, data_, 1, 2, False, row_step=64, decode_steps=4)
    if "alphas" not in token_alphas and (out.parent / "token_head/report.json").is_file():   # a reused first row
        token_alphas["alphas"] = json.loads((out.parent / "token_head/report.json").read_text())["alphas"]
    if "alphas" in token_alphas:
        cfg.update(alpha=0.5, site_alpha=tuple(token_alphas["alphas"].items()))
    else:
        cfg.update(alpha="auto")
    res = quantize(src, out / "model.onnx", None, PipelineConfig(**cfg), progress=False,
                   stats=token_alphas["stats"])
    token_alphas.setdefault("alphas", res.alphas)
    (out / "report.json").write_text(json.dumps({"alphas": res.alphas, "steps": res.steps}, indent=1))
    print(res.format(), flush=True)


def build(work: Path) -> dict[str, Path]:
    """Every row's model path (optimum rows) or folder (genai rows), building what is missing."""
    paths = {"fp32": MODELS / "smollm2_optimum/model.onnx", "genai_fp32": MODELS / "smollm2_genai"}
    token_alphas: dict = {}
    for key in ["token_head", "token", "route", "token_emb", "route_emb", "w8", "w4", "w4_b32"]:
        out = work / key
        if not (out / "model.onnx").is_file():
            out.mkdir(parents=True, exist_ok=True)
            _quantize(paths["fp32"], out, OPTIMUM[key], MODELS / "data/calib-past.npz", token_alphas)
        paths[key] = out / "model.onnx"
    out = work / "ort_dynamic/model.onnx"
    if not out.is_file():
        from _measure import ort_peer

        out.parent.mkdir(parents=True, exist_ok=True)
        ort_peer("ort-dynamic", str(paths["fp32"]), str(out), "")
    paths["ort_dynamic"] = out
    for p in ("int8", "int4"):
        out = work / f"genai_{p}"
        if not (out / "genai_config.json").is_file():
            sys.path.insert(0, str(HERE.parent / "models"))
            import _export
            from smollm2_genai import build as builder

            builder(_export.smollm2_hf(work / "hf"), out, p)
        paths[f"genai_{p}"] = out
    for key, flags in GENAI.items():
        out = work / key
        if not (out / "model.onnx").is_file():
            out.mkdir(parents=True, exist_ok=True)
            _quantize(paths["genai_fp32"] / "model.onnx", out, flags, MODELS / "data/calib-genai.npz", {})
        paths[key] = out
    return paths


def _model(p: Path) -> Path:
    return p / "model.onnx" if p.is_dir() else p


def accuracy(paths: dict[str, Path], work: Path) -> dict[str, dict]:
    from graphpass import evaluate
    from graphpass.calibrate.data import load_data

    out = {}
    for form, ref, data in (("optimum", "fp32", "eval-past.npz"), ("genai", "genai_fp32", "eval-genai.npz")):
        d = load_data(str(MODELS / "data" / data))
        for key, p in paths.items():
            if key == ref or (key.startswith(("genai", "gp_")) != (form == "genai")):
                continue
            m = evaluate(_model(p), _model(paths[ref]), d, progress=False, ref_cache=work / f"ref_{form}")
            out[key] = {"ppl": m["perplexity_candidate"], "kl": m["kl"], "top1": m["top1"],
                        "ref_ppl": m["perplexity_reference"]}
            print(f"{key}: ppl {out[key]['ppl']:.3f} KL {out[key]['kl']:.4f}", file=sys.stderr, flush=True)
    return out


def plain_speed(paths: dict[str, Path], rounds: int) -> list[dict]:
    from bench_decode import bench, prompt_ids

    keys = ["fp32", "token", "token_head", "route", "token_emb", "route_emb", "w8", "w4", "w4_b32", "ort_dynamic",
            "genai_int8", "genai_int4"]
    prompt, _ = prompt_ids(str(paths["fp32"]), None, 256)
    rows = bench([str(_model(paths[k])) for k in keys], prompt, 64, rounds, 2)
    for k, r in zip(keys, rows):
        r["key"] = k
    return rows


def genai_speed(paths: dict[str, Path], rounds: int) -> dict[str, dict]:
    from bench_genai import speed
    from graphpass.calibrate.data import play_path, tokenize

    keys = ["genai_fp32", "genai_int8", "genai_int4", "gp_w8", "gp_w4", "gp_w4_b32"]
    ids = tokenize(play_path("hamlet"), paths["genai_fp32"] / "tokenizer.json")[1000:1256]
    return speed({k: paths[k] for k in keys}, ids, 64, 3, rounds, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4, help="lockstep rounds in plain onnxruntime")
    ap.add_argument("--og-rounds", type=int, default=2, help="model loads per folder in the genai runtime")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-genai", action="store_true", help="no onnxruntime-genai runtime timing")
    ap.add_argument("--json", type=Path, help="default: WORK/decode_table.json")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    paths = build(a.work)
    res = {"load_start": os.getloadavg()[0]}
    res["accuracy"] = {} if a.skip_accuracy else accuracy(paths, a.work)
    res["plain"] = plain_speed(paths, a.rounds)
    res["load_plain"] = os.getloadavg()[0]
    res["genai"] = {} if a.skip_genai else genai_speed(paths, a.og_rounds)
    res["load_end"] = os.getloadavg()[0]
    (a.json or a.work / "decode_table.json").write_text(json.dumps(res, indent=1, default=str))
    print(render(res, paths))
    return 0


def _size(p: Path) -> float:
    from bench_genai import folder_size
    from graphpass.graph.io import model_size

    return (folder_size(p) if p.is_dir() and (p / "genai_config.json").is_file() else model_size(_model(p))) / 1e6


def render(res: dict, paths: dict[str, Path]) -> str:
    acc = res["accuracy"]
    ref = next(r for r in res["plain"] if r["key"] == "fp32")
    lines = ["| model | perplexity | KL | top-1 | size MB | TTFT | decode ms/token | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["plain"]:
        k, a = r["key"], acc.get(r["key"], {})
        ppl = f"{a['ppl']:.2f} ({a['ppl'] / a['ref_ppl']:.4f}x)" if a else ("41.95" if k == "fp32" else "—")
        tt = f"{r['ttft_ms']:.0f} ms" if k == "fp32" else f"{r['ttft_ratio']:.2f}x"
        ms = f"{r['ms_per_token']:.1f}" if k == "fp32" else f"{r['token_ratio']:.2f}x ({r['ms_per_token']:.1f})"
        lines.append(f"| {LABEL[k]} | {ppl} | {a.get('kl', 0):.4f} | {a.get('top1', 1):.3f} | {_size(paths[k]):.0f} "
                     f"| {tt} | {ms} | {r['tokens_per_s']:.1f} |")
    lines.append(f"\nFP32 plain onnxruntime: TTFT {ref['ttft_ms']:.0f} ms, {ref['ms_per_token']:.1f} ms/token; "
                 f"CPU ms/token ratios: " + ", ".join(f"{r['key']} {r['cpu_ratio']:.2f}x" for r in res["plain"]))
    if res["genai"]:
        lines += ["", "| model (onnxruntime-genai runtime) | perplexity | KL | top-1 | size MB | TTFT s (median / min) "
                  "| ms/token (median / p10) | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, s in res["genai"].items():
            a = acc.get(k, {})
            ppl = f"{a['ppl']:.2f}" if a else ("41.95" if k == "genai_fp32" else "—")
            lines.append(f"| {LABEL[k]} | {ppl} | {a.get('kl', 0):.4f} | {a.get('top1', 1):.3f} | {_size(paths[k]):.0f} "
                         f"| {s['ttft_s']:.3f} / {s['ttft_min_s']:.3f} | {s['ms_per_token']:.2f} / "
                         f"{s['ms_per_token_p10']:.2f} | {1e3 / s['ms_per_token']:.1f} |")
    lines.append(f"\nload average: {res['load_start']:.1f} at the start, {res['load_plain']:.1f} after the plain "
                 f"onnxruntime timing, {res['load_end']:.1f} at the end")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
