#!/usr/bin/env bash
# The main job on the built-in default: SmolLM2-135M, calibrate on Othello, evaluate on Hamlet.
# Usage: bash tools/main_job.sh [OUT_DIR]   (default: out/)
set -euo pipefail
OUT=${1:-out}
M=$OUT/smollm2
mkdir -p "$M"
if [ ! -f "$M/model.onnx" ]; then
  python models/smollm2.py --out "$M"
fi
graphpass data --play othello --tokenizer "$M/tokenizer.json" --seq-len 512 --samples 32 -o "$OUT/calib.npz"
graphpass data --play hamlet  --tokenizer "$M/tokenizer.json" --seq-len 512 --samples 16 -o "$OUT/eval.npz"
# Until the quantization passes land, the pipeline's candidate is the FP32 graph itself.
graphpass eval "$M/model.onnx" --reference "$M/model.onnx" --data "$OUT/eval.npz" --json "$OUT/eval.json"
graphpass bench "$M/model.onnx" --reference "$M/model.onnx" --shape 1x512 --shape 1x32 --json "$OUT/bench.json"
