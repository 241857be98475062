"""Helpers for tools/bench_quant.py: a child process measured by GNU time, the machine line,
and the onnxruntime.quantization peers (run as `python tools/_measure.py ort-dynamic|ort-static
MODEL OUT CALIB` so they are measured exactly like `graphpass quantize`)."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd` under `/usr/bin/time -v`; return (wall seconds, peak RSS in GB) of the child.

    GNU time reports the child's own ru_maxrss (kB), so one row never inherits another's peak.
    The child's stdout and stderr go to `log`; a non-zero exit raises with its last line.
    """
    report = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", "-o", str(report), *cmd],
                             stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = re.sub(r"^[\w.]+\.(\w+(Error|Exception)): ", r"\1: ", lines[-1]) if lines else ""
        raise RuntimeError(last[:160] or f"exit status {rc}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return wall, (int(m.group(1)) / 1e6 if m else float("nan"))


def cpu_seconds(log: Path) -> float:
    """User + system CPU seconds of the child `run_measured(cmd, log)` ran (its GNU time report)."""
    text = log.with_suffix(".time").read_text()
    return sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1)) for k in ("User", "System"))


def machine() -> str:
    cpu, vnni = platform.processor() or "unknown CPU", False
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        vnni = "avx512_vnni" in info
    except (OSError, AttributeError):
        pass
    import onnx
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores{' (AVX-512 VNNI)' if vnni else ''}, "
            f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}")


class NpzReader:
    """onnxruntime's CalibrationDataReader protocol over an .npz: one sample per get_next()."""

    def __init__(self, path: str):
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            self.data = {k: z[k] for k in z.files}
        self.n, self.i = next(iter(self.data.values())).shape[0], 0

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1:self.i] for k, v in self.data.items()}

    def rewind(self):
        self.i = 0


def ort_peer(kind: str, model: str, out: str, calib: str) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)

    if kind == "ort-dynamic":
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
        return
    reader = type("Reader", (NpzReader, CalibrationDataReader), {})(calib)
    quantize_static(model, out, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in ("ort-dynamic", "ort-static"):
        sys.exit("usage: python tools/_measure.py ort-dynamic|ort-static MODEL OUT CALIB")
    ort_peer(*sys.argv[1:])
