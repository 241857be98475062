"""Calibration cost against plain FP32 inference over the same data, measured in one run.

    python tools/bench_calibration.py --model M/model.onnx --data calib.npz

Runs, each in its own process under /usr/bin/time -v (wall time and peak RSS):
  1. plain FP32 inference of every sample (one onnxruntime session, batch 1, 2 threads);
  2. `graphpass calibrate` over the same samples.
Prints time ratio (calibrate / FP32) and peak memory against the model's size on disk.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

from graphpass.graph.io import model_size

FP32_SCRIPT = """
import sys, numpy as np
from graphpass.graph.runtime import make_session
s = make_session(sys.argv[1], 2)
d = dict(np.load(sys.argv[2]))
n = next(iter(d.values())).shape[0]
for i in range(n):
    s.run(None, {k: v[i:i + 1] for k, v in d.items()})
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a child process, from GNU time."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return h * 3600 + m * 60 + s, rss / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--stats", default="/tmp/bench_calibration_stats.npz")
    a = ap.parse_args(argv)
    size = model_size(a.model) / 2**30
    fp32_t, fp32_m = timed([sys.executable, "-c", FP32_SCRIPT, a.model, a.data])
    cal_t, cal_m = timed(["graphpass", "calibrate", a.model, "--data", a.data, "-o", a.stats])
    print(f"model size on disk: {size:.3f} GB")
    print("| run | wall | peak memory | vs model size |")
    print("|---|---|---|---|")
    print(f"| FP32 inference | {fp32_t:.1f} s | {fp32_m:.2f} GB | {fp32_m / size:.2f}x |")
    print(f"| graphpass calibrate | {cal_t:.1f} s ({cal_t / fp32_t:.2f}x FP32) | {cal_m:.2f} GB | {cal_m / size:.2f}x |")


if __name__ == "__main__":
    main()
