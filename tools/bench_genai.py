"""Genai-form decoders in one run: accuracy in onnxruntime, speed in the onnxruntime-genai runtime.

    python tools/bench_genai.py --ref FP32_FOLDER NAME=FOLDER ... [--json out.json]

Accuracy (plain onnxruntime, 2 threads, each with-past graph in prefill mode: empty past):
Hamlet windows of --seq-len tokens; perplexity of each model on the next token, KL(FP32 || model)
and top-1 agreement with FP32, averaged over every position. Speed (onnxruntime-genai runtime,
session_options.intra_op_num_threads = --threads in a copy of genai_config.json): a prompt of
--prompt Hamlet tokens, then --steps greedy tokens; time to first token (prompt in + first token
out) and the median ms per later token; each model --repeats times, models interleaved in blocks.
Run it with a Python that has onnxruntime_genai (it need not have graphpass's dependencies'
newest versions: only numpy, onnxruntime and tokenizers are used).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphpass.calibrate.data import play_path, tokenize  # noqa: E402
from graphpass.graph.runtime import make_session  # noqa: E402


def folder_size(folder: Path) -> int:
    cfg = json.loads((folder / "genai_config.json").read_text())
    onnx_file = folder / cfg["model"]["decoder"]["filename"]
    data = [p for p in folder.iterdir() if p.name.startswith(onnx_file.name + ".data") or p.suffix == ".data"]
    return onnx_file.stat().st_size + sum(p.stat().st_size for p in data)


def decoder_path(folder: Path) -> Path:
    return folder / json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]


def _empty_past(sess, folder: Path, batch: int) -> dict[str, np.ndarray]:
    """past_key_values.* of length 0; kv heads and head size from genai_config.json."""
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    shape = (batch, dec["num_key_value_heads"], 0, dec["head_size"])
    return {i.name: np.zeros(shape, np.float32) for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def accuracy(folders: dict[str, Path], ref: str, windows: np.ndarray, threads: int) -> dict[str, dict]:
    """Every model over the same windows, one window at a time (no logits kept across windows)."""
    sess = {k: make_session(decoder_path(f), threads) for k, f in folders.items()}
    acc = {k: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0} for k in folders}
    for w in windows:
        ids = w[None, :]
        logp = {}
        for k, s in sess.items():
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **_empty_past(s, folders[k], 1)}
            logp[k] = _log_softmax(s.run(["logits"], feeds)[0][0, :-1])
        target = w[1:]
        p_ref = np.exp(logp[ref])
        for k, lp in logp.items():
            a = acc[k]
            a["nll"] -= float(lp[np.arange(len(target)), target].sum())
            a["kl"] += float((p_ref * (logp[ref] - lp)).sum())
            a["top1"] += int((lp.argmax(-1) == logp[ref].argmax(-1)).sum())
            a["n"] += len(target)
        print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return {k: {"ppl": float(np.exp(a["nll"] / a["n"])), "kl": a["kl"] / a["n"], "top1": a["top1"] / a["n"]}
            for k, a in acc.items()}


def _og_folder(src: Path, dst: Path, threads: int) -> Path:
    """A folder of links to `src` with genai_config.json setting the thread count."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "genai_config.json":
            os.symlink(p.resolve(), dst / p.name)
    cfg = json.loads((src / "genai_config.json").read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"] = threads
    so["inter_op_num_threads"] = 1
    (dst / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    return dst


def og_time(folder: Path, prompt: np.ndarray, steps: int, repeats: int) -> dict:
    """Median time to first token (s) and ms/token over `repeats` generations in one model load."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ttft, per_tok, all_gaps, tokens = [], [], [], None
    for r in range(repeats + 1):              # the first run warms up and is not counted
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + steps, min_length=len(prompt) + steps)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        gen.generate_next_token()
        t1 = time.perf_counter()
        gaps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            gaps.append(time.perf_counter() - t)
        if r:
            ttft.append(t1 - t0)
            per_tok.append(statistics.median(gaps) * 1e3)
            all_gaps += gaps
        tokens = [int(t) for t in gen.get_sequence(0)][len(prompt):]
        del gen
    del model
    return {"ttft_s": statistics.median(ttft), "ms_per_token": statistics.median(per_tok), "tokens": tokens,
            "ttft_min_s": min(ttft), "gaps_ms": [g * 1e3 for g in all_gaps]}


def speed(folders: dict[str, Path], prompt: np.ndarray, steps: int, repeats: int, rounds: int,
          threads: int) -> dict[str, dict]:
    res: dict[str, list] = {k: [] for k in folders}
    with tempfile.TemporaryDirectory(prefix="bench-genai-") as tmp:
        og_dirs = {k: _og_folder(f, Path(tmp) / k, threads) for k, f in folders.items()}
        for r in range(rounds):                    # blocks of one model, order reversed each round
            for k in (list(og_dirs) if r % 2 == 0 else list(og_dirs)[::-1]):
                res[k].append(og_time(og_dirs[k], prompt, steps, repeats))
                time.sleep(1.0)
                print(f"{k}: {res[k][-1]['ttft_s']:.3f} s, {res[k][-1]['ms_per_token']:.2f} ms/token",
                      file=sys.stderr)
    out = {}
    for k, rows in res.items():
        gaps = np.array([g for x in rows for g in x["gaps_ms"]])
        out[k] = {"ttft_s": statistics.median(x["ttft_s"] for x in rows),
                  "ms_per_token": statistics.median(x["ms_per_token"] for x in rows), "tokens": rows[-1]["tokens"],
                  # on a shared machine the low tail is the least disturbed measure
                  "ttft_min_s": min(x["ttft_min_s"] for x in rows), "ms_per_token_p10": float(np.percentile(gaps, 10))}
    return out


def table(folders, ref, acc, spd) -> str:
    lines = ["| model | perplexity | KL vs FP32 | top-1 | size MB | TTFT s (median / min) | ms/token (median / p10) "
             "| tokens/s | greedy = FP32 |", "|---|---|---|---|---|---|---|---|---|"]
    for k, f in folders.items():
        a, s = acc.get(k, {}), spd.get(k, {})
        same = ""
        if s and ref in spd:
            t, r = s["tokens"], spd[ref]["tokens"]
            same = f"{next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), min(len(t), len(r)))}/{len(r)}"
        lines.append(f"| {k} | {a.get('ppl', float('nan')):.2f} | {a.get('kl', float('nan')):.4f} | "
                     f"{a.get('top1', float('nan')):.3f} | {folder_size(f) / 1e6:.1f} | "
                     f"{s.get('ttft_s', float('nan')):.3f} / {s.get('ttft_min_s', float('nan')):.3f} | "
                     f"{s.get('ms_per_token', float('nan')):.2f} / {s.get('ms_per_token_p10', float('nan')):.2f} | "
                     f"{1e3 / s['ms_per_token'] if s else float('nan'):.1f} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="NAME=FOLDER")
    ap.add_argument("--ref", required=True, help="name of the FP32 model among NAME=FOLDER")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the reference folder's)")
    ap.add_argument("--play", default="hamlet")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="generations per model load")
    ap.add_argument("--rounds", type=int, default=2, help="model loads per model (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    folders = dict((m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in a.models)
    if a.ref not in folders:
        ap.error(f"--ref {a.ref} is not one of {list(folders)}")
    ids = tokenize(play_path(a.play), a.tokenizer or folders[a.ref] / "tokenizer.json")
    windows = ids[: a.samples * a.seq_len].reshape(a.samples, a.seq_len)
    acc = {} if a.skip_accuracy else accuracy(folders, a.ref, windows, a.threads)
    spd = {} if a.skip_speed else speed(folders, ids[: a.prompt], a.steps, a.repeats, a.rounds, a.threads)
    print(table(folders, a.ref, acc, spd))
    if a.json:
        Path(a.json).write_text(json.dumps({"accuracy": acc, "speed": spd,
                                            "sizes": {k: folder_size(f) for k, f in folders.items()}}, indent=2))


if __name__ == "__main__":
    main()
