"""Cost as work grows: `graphpass quantize` on synthetic Llama models of 1, 2, 4 and 8x the layers.

Usage:
  python tools/bench_scaling.py [--layers 4 8 16 32] [--hidden 512] [--ffn 1536] [--vocab 8192]
      [--samples 8] [--seq 128] [--threads 2] [--repeat 1] [--work DIR] [--out scaling.md] [--keep]

Per size, one after another: graphpass.testing.synthetic.build_llama(SyntheticConfig(layers=L, ...)),
seeded, saved with graphpass.graph.io.save_model; calibration data of `samples` x `seq` random token ids;
then a child `python -m graphpass quantize MODEL -o OUT --data DATA --threads T` (token scheme,
alpha auto: calibrate, per-site alpha search, smooth, W8A8, checker, save) under GNU
`/usr/bin/time -v`: wall time (Python start-up included), CPU time (user + system: what the work
costs, much less sensitive than wall time to other load on the machine), max RSS. With --repeat,
the fastest times and the largest peak.
The table ends with a least-squares line per quantity (cost = a + b * layers) and the largest
relative distance of a measurement from that line: small means linear growth.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """Run `cmd` under `/usr/bin/time -v`: (wall seconds, CPU seconds = user + system, peak RSS
    in GB) of the child itself. Its output goes to `log`; a non-zero exit raises with its last line."""
    report = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", "-o", str(report), *cmd], stdout=f,
                             stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise RuntimeError(f"{' '.join(cmd[:4])}: exit {rc}: {lines[-1][:300] if lines else ''}")
    text = report.read_text()
    num = lambda key: float(re.search(rf"{key}: ([\d.]+)", text).group(1))  # noqa: E731
    cpu = num(r"User time \(seconds\)") + num(r"System time \(seconds\)")
    return wall, cpu, num(r"Maximum resident set size \(kbytes\)") / 1e6


def build(folder: Path, layers: int, a: argparse.Namespace) -> tuple[Path, Path, int]:
    """(model path, data path, weight bytes) of one seeded synthetic Llama."""
    from graphpass.graph.io import model_size, save_model
    from graphpass.testing.synthetic import SyntheticConfig, build_llama

    folder.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(layers=layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn,
                          vocab=a.vocab, seed=layers)
    model = build_llama(cfg)
    path = save_model(model, folder / "model.onnx")
    del model
    ids = np.random.default_rng(0).integers(0, a.vocab, (a.samples, a.seq), dtype=np.int64)
    np.savez(folder / "calib.npz", input_ids=ids)
    return path, folder / "calib.npz", model_size(path)


def fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, largest |y - line| / y) of the least-squares line y = a + b x."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    dev = max(abs(yi - (a + b * xi)) / yi for xi, yi in zip(x, y))
    return float(a), float(b), float(dev)


def table(rows: list[dict], a: argparse.Namespace) -> str:
    lines = [f"`graphpass quantize` (token scheme, alpha auto, {a.threads} thread(s), best of {a.repeat}) on "
             f"synthetic Llama, "
             f"hidden {a.hidden}, ffn {a.ffn}, {a.heads} heads / {a.kv_heads} kv heads, vocab {a.vocab}; "
             f"calibration {a.samples} x {a.seq} tokens.", "",
             "| layers | model size | wall time | CPU time | CPU time / layer | peak memory | memory / model size |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['bytes'] / 1e6:.0f} MB | {r['seconds']:.1f} s | {r['cpu']:.1f} s | "
                     f"{r['cpu'] / r['layers']:.2f} s | {r['peak_gb']:.2f} GB | {r['peak_gb'] * 1e9 / r['bytes']:.2f}x |")
    if len(rows) >= 2:
        xs = [r["layers"] for r in rows]
        for what, key, unit in (("wall time", "seconds", "s"), ("CPU time", "cpu", "s"),
                                ("peak memory", "peak_gb", "GB")):
            c, slope, dev = fit(xs, [r[key] for r in rows])
            lines.append(f"\n{what}: {c:.3g} {unit} + {slope:.3g} {unit} per layer "
                         f"(largest distance of a measurement from this line: {100 * dev:.1f}%)")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per size: the fastest time, the largest peak")
    p.add_argument("--work", help="folder for models and logs (default: a temporary one, deleted)")
    p.add_argument("--out", help="also write the Markdown table here")
    p.add_argument("--keep", action="store_true", help="keep the models in --work")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="gp_scaling_"))
    rows = []
    try:
        for layers in a.layers:
            d = work / f"L{layers}"
            model, data, size = build(d, layers, a)
            cmd = [sys.executable, "-m", "graphpass", "quantize", str(model), "-o", str(d / "int8.onnx"),
                   "--data", str(data), "--threads", str(a.threads)]
            runs = [timed(cmd, d / "quantize.log") for _ in range(a.repeat)]
            wall, cpu, peak = (min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs))
            rows.append(dict(layers=layers, bytes=size, seconds=wall, cpu=cpu, peak_gb=peak))
            print(f"{layers} layers: {size / 1e6:.0f} MB, {wall:.1f} s wall, {cpu:.1f} s CPU, {peak:.2f} GB",
                  flush=True)
            if not a.keep:
                for f in d.glob("*.onnx*"):
                    f.unlink()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    md = table(rows, a)
    print("\n" + md)
    if a.out:
        Path(a.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
