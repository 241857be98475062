"""Write a tiny synthetic transformer (graphpass.testing.synthetic) with injected activation outliers.

    python models/tiny.py --kind {prenorm,llama,postln} --out DIR [--layers N --hidden H --seed S]

DIR/model.onnx and DIR/model.json ({"name": "tiny-<kind>", "kind": "causal-lm" | "encoder",
"inputs": [...], "outputs": [...], "config": {...}}). No tokenizer: feed random token ids.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

try:
    import graphpass  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphpass.graph.io import save_model
from graphpass.testing.synthetic import (RMS_FORMS, SyntheticConfig, build_llama, build_postln_encoder,
                                 build_prenorm_decoder)

KINDS = {
    "prenorm": (build_prenorm_decoder, "causal-lm"),
    "llama": (build_llama, "causal-lm"),
    "postln": (build_postln_encoder, "encoder"),
}


def parse_args(argv) -> argparse.Namespace:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=sorted(KINDS))
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--opset", type=int, default=d.opset)
    p.add_argument("--rms-form", choices=RMS_FORMS, default=d.rms_form, help="llama only")
    p.add_argument("--gemm", action="store_true", help="postln only: Gemm(transB=1) linears")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = SyntheticConfig(layers=args.layers, hidden=args.hidden, ffn=2 * args.hidden,
                              seed=args.seed, opset=args.opset, rms_form=args.rms_form,
                              gemm=args.gemm)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build, kind = KINDS[args.kind]
    model = build(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_model(model, args.out / "model.onnx")
    meta = {"name": f"tiny-{args.kind}", "kind": kind,
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output], "config": asdict(cfg)}
    (args.out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {path} ({len(model.graph.node)} nodes, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
