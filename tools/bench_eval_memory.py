"""Peak memory and wall time of `graphpass eval` against samples and vocabulary, on the synthetic
big-vocabulary decoder (graphpass.testing.big_vocab: one Llama block, hidden 64, tied table).

    python tools/bench_eval_memory.py --vocab 32768 --vocab 262144 --samples 4 --samples 16 --seq 128

Each eval runs in a child process (peak = its RUSAGE_CHILDREN.ru_maxrss); the candidate is the
reference with one [64, 64] weight scaled by 1.05, so every metric is non-trivial.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphpass.graph.io import model_size, save_model  # noqa: E402
from graphpass.testing.big_vocab import build_big_vocab_decoder, cli_peak_memory  # noqa: E402
from graphpass.testing.synthetic import random_inputs  # noqa: E402
from graphpass.validate.evaluate import capped_batch  # noqa: E402


def _models(folder: Path, vocab: int) -> tuple[Path, Path]:
    m = build_big_vocab_decoder(vocab)
    ref = folder / f"v{vocab}" / "ref.onnx"
    ref.parent.mkdir(parents=True, exist_ok=True)
    save_model(m, ref)
    t = next(t for t in m.graph.initializer if len(t.dims) == 2 and t.dims[0] == t.dims[1])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.05), t.name))
    cand = ref.with_name("cand.onnx")
    save_model(m, cand)
    return ref, cand


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, action="append")
    ap.add_argument("--samples", type=int, action="append")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args()
    print("| vocabulary | model size | samples x tokens | logits per batch | eval peak memory | wall time |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-eval-mem-") as tmp:
        for vocab in a.vocab or [32768, 262144]:
            ref, cand = _models(Path(tmp), vocab)
            for n in a.samples or [4, 16]:
                data = ref.with_name(f"data{n}.npz")
                np.savez(data, **random_inputs(build_big_vocab_decoder(vocab), n, a.seq, seed=1))
                r = cli_peak_memory(["eval", cand, "--reference", ref, "--data", data,
                                     "--batch-size", a.batch_size])
                if r["rc"] != 0:
                    raise SystemExit(r["stderr"])
                m = build_big_vocab_decoder(vocab)       # the batch eval really runs (capped_batch)
                b = capped_batch(m, [m.graph.output[0].name], {"input_ids": np.zeros((n, a.seq))}, a.batch_size)
                logits = min(b, n) * a.seq * vocab * 4
                print(f"| {vocab:,} | {model_size(ref) / 1e6:.0f} MB | {n} x {a.seq} | {logits / 2**20:.0f} MiB "
                      f"| {r['peak_bytes'] / 2**30:.2f} GiB | {r['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
