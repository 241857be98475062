"""A synthetic Llama whose weights pass protobuf's 2 GB limit, and graphpass run on it end to end.

Usage:
  python tools/make_large_model.py OUT [--layers 12 --hidden 2048 --ffn 5632 --vocab 32000]
  python tools/make_large_model.py OUT --run [--threads 2]     # then calibrate -> smooth ->
                                                                # quantize -> eval, each measured
Build. graphpass.testing.synthetic.build_llama at a larger SyntheticConfig (default 12 layers, hidden
2048, 16 heads / 4 kv heads, ffn 5632, vocab 32000: 2.43 GB of seeded float32 weights). While the
builder draws the weights, each one goes straight to a scratch file and the graph only points at
it, so the builder's own shape inference and onnx.checker run on a small proto. The weights are
then read into one ModelProto (over 2 GB: protobuf cannot serialize it) and written by
graphpass.graph.io.save_model(external=True), whose external path moves every tensor's bytes to
OUT/model.onnx.data before it serializes the graph. Also written: model.json, calib.npz and
eval.npz (random token ids, seeded, disjoint seeds).

Run. Each step is a child `python -m graphpass ...` under GNU `/usr/bin/time -v` (wall time and
the child's own peak RSS): calibrate; smooth (alpha 0.5); quantize (token scheme, alpha auto);
eval of the smoothed and of the int8 model against the FP32 one. A table compares peak memory
with the model's size on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import timed  # noqa: E402

SCRATCH = "weights.scratch"


@contextmanager
def weights_to_file(folder: Path):
    """Make graphpass.testing.synthetic's GraphBuilder write each weight >= 1 KB to folder/SCRATCH (64-byte
    aligned) and keep only an external reference in the graph. The working directory is the folder
    meanwhile, so the builder's onnx.checker finds the file."""
    import graphpass.testing.synthetic as synthetic
    from graphpass.testing.blocks import GraphBuilder

    sink = open(folder / SCRATCH, "wb")

    class ExternalBuilder(GraphBuilder):
        def weight(self, name: str, array: np.ndarray) -> str:
            arr = np.array(array, order="C")
            if arr.nbytes < 1024:
                return super().weight(name, arr)
            name = self._unique(name)
            sink.write(b"\0" * (-sink.tell() % 64))
            offset = sink.tell()
            sink.write(memoryview(arr).cast("B"))
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
            for key, value in (("location", SCRATCH), ("offset", offset), ("length", arr.nbytes)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            t.data_location = TensorProto.EXTERNAL
            self.inits.append(t)
            return name

    cwd, original = os.getcwd(), synthetic.GraphBuilder
    synthetic.GraphBuilder = ExternalBuilder
    os.chdir(folder)
    try:
        yield sink
    finally:
        os.chdir(cwd)
        synthetic.GraphBuilder = original
        sink.close()


def build(out: Path, a: argparse.Namespace) -> Path:
    from graphpass.graph.io import model_size, save_model
    from graphpass.testing.synthetic import SyntheticConfig, build_llama

    out.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn,
                          vocab=a.vocab, seed=0, outlier_channels=(3, 17))
    with weights_to_file(out.resolve()) as sink:
        model = build_llama(cfg)
        sink.flush()
    onnx.load_external_data_for_model(model, str(out))      # one in-memory proto, > 2 GB
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    print(f"built: {len(model.graph.node)} nodes, {inline / 1e9:.2f} GB of weights in memory "
          f"({'over' if inline > 2**31 else 'under'} the 2 GB protobuf limit)", flush=True)
    path = save_model(model, out / "model.onnx", external=True, release=True)
    del model
    (out / SCRATCH).unlink()
    (out / "model.json").write_text(json.dumps({"kind": "causal-lm", "inputs": ["input_ids"],
                                                "outputs": ["logits"]}) + "\n")
    for name, seed, n in (("calib", 1, a.calib_samples), ("eval", 2, a.eval_samples)):
        ids = np.random.default_rng(seed).integers(0, a.vocab, (n, a.seq), dtype=np.int64)
        np.savez(out / f"{name}.npz", input_ids=ids)
    print(f"wrote {path}: {model_size(path) / 1e9:.2f} GB on disk with its external data", flush=True)
    return path


def run(out: Path, a: argparse.Namespace) -> str:
    from graphpass.graph.io import model_size

    gp = [sys.executable, "-m", "graphpass"]
    th = ["--threads", str(a.threads)]
    m = str(out / "model.onnx")
    for d in ("smoothed", "int8"):
        (out / d).mkdir(exist_ok=True)
    steps = [
        ("calibrate", gp + ["calibrate", m, "--data", str(out / "calib.npz"), "-o", str(out / "stats.npz")] + th),
        ("smooth", gp + ["smooth", m, "--stats", str(out / "stats.npz"), "--alpha", "0.5", "-o",
                         str(out / "smoothed" / "model.onnx")]),
        ("quantize", gp + ["quantize", m, "--data", str(out / "calib.npz"), "-o", str(out / "int8" / "model.onnx")]
         + th),
        ("eval smoothed", gp + ["eval", str(out / "smoothed" / "model.onnx"), "--reference", m, "--data",
                                str(out / "eval.npz"), "--json", str(out / "eval_smoothed.json")] + th),
        ("eval int8", gp + ["eval", str(out / "int8" / "model.onnx"), "--reference", m, "--data",
                            str(out / "eval.npz"), "--json", str(out / "eval_int8.json")] + th),
    ]
    size = model_size(m)
    rows = [f"model: {size / 1e9:.2f} GB ({out / 'model.onnx'} + external data)", "",
            "| step | wall time | CPU time | peak memory | peak / model size | output |", "|---|---:|---:|---:|---:|---|"]
    for name, cmd in steps:
        log = out / f"{name.replace(' ', '_')}.log"
        seconds, cpu, peak = timed(cmd, log)
        what = ""
        if name in ("smooth", "quantize"):
            dest = out / ("smoothed" if name == "smooth" else "int8") / "model.onnx"
            files = sorted(p.name for p in dest.parent.iterdir())
            what = f"{model_size(dest) / 1e9:.2f} GB ({', '.join(files)})"
        elif name.startswith("eval"):
            r = json.loads((out / f"{name.replace(' ', '_')}.json").read_text())
            what = (f"perplexity {r['perplexity_reference']:.3f} -> {r['perplexity_candidate']:.3f}, "
                    f"KL {r['kl']:.2e}, top-1 {r['top1']:.4f}")
        rows.append(f"| {name} | {seconds:.0f} s | {cpu:.0f} s | {peak:.2f} GB | {peak * 1e9 / size:.2f}x | {what} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", action="store_true", help="run the pipeline on it (builds first if missing)")
    a = p.parse_args(argv)
    if not (a.out / "model.onnx").exists():
        build(a.out, a)
    if a.run:
        print("\n" + run(a.out, a))


if __name__ == "__main__":
    main()
