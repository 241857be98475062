"""A decoder whose vocabulary dwarfs its body: the fixture for memory at current-LLM vocabularies
(128k-262k tokens), where one batch of logits weighs more than every weight but the tables.

  build_big_vocab_decoder   build_llama with vocab 262,144, one layer, hidden 64:
                            input_ids [b, n] -> logits [b, n, V], logits = RMSNorm(x) E^T

The body is tiny (one Llama block, ~0.1 MB of linear weights) and the tied table E is V x 64
floats (67 MB at V = 262,144), so the model is small while one sample of 512 tokens has
512 x 262,144 x 4 B = 512 MB of logits: any copy of the logits held for the data set, or a
float64 log-softmax of a whole batch, dominates peak memory and shows as growth with samples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from graphpass.testing.synthetic import SyntheticConfig, build_llama, random_inputs

BIG_VOCAB = 262_144


def big_vocab_config(vocab: int = BIG_VOCAB, layers: int = 1, seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(layers=layers, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=vocab,
                           seed=seed)


def build_big_vocab_decoder(vocab: int = BIG_VOCAB, layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Llama-style causal decoder (see module docstring); weights seeded, outliers as in synthetic."""
    return build_llama(big_vocab_config(vocab, layers, seed))


def write_big_vocab_folder(folder: str | Path, vocab: int = BIG_VOCAB, samples: int = 4, seq: int = 128,
                           seed: int = 0) -> tuple[Path, Path]:
    """folder/model.onnx (+ model.json, kind causal-lm) and folder/data.npz of `samples` x `seq`
    random token ids; returns (model path, data path)."""
    import json

    from graphpass.graph.io import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_big_vocab_decoder(vocab, seed=seed)
    path = folder / "model.onnx"
    save_model(model, path)
    (folder / "model.json").write_text(json.dumps({"kind": "causal-lm"}))
    data = random_inputs(model, samples, seq, seed=seed + 1)
    np.savez(folder / "data.npz", **data)
    return path, folder / "data.npz"


_WRAPPER = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,\n"
            "                  'seconds': time.perf_counter() - t, 'rc': p.returncode,\n"
            "                  'stdout': p.stdout, 'stderr': p.stderr[-2000:]}))\n")
_CLI = "import sys\nfrom graphpass.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


def cli_peak_memory(args: list) -> dict:
    """Run `graphpass ARGS` in a child process and return its peak resident memory:
    {'peak_bytes', 'seconds', 'rc', 'stdout', 'stderr'}. A wrapper process runs the command as its
    only child and reads resource.getrusage(RUSAGE_CHILDREN).ru_maxrss (KiB on Linux), so nothing
    else this process ever ran is counted."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-c", _CLI, *[str(a) for a in args]]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out["peak_bytes"] = out.pop("maxrss_kb") * 1024
    return out
