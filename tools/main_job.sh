#!/usr/bin/env bash
# The main job on the built-in default: SmolLM2-135M-Instruct, calibrated on Othello (32 x 512
# tokens), evaluated on Hamlet (16 x 512).
#  1. The with-past graph people deploy (optimum-onnx `text-generation-with-past`): quantize
#     (W8A8 token, SmoothQuant with per-site alpha, calibration over prefill and decode steps,
#     attention with its cache fused to GroupQueryAttention, and --decode-route: one new token runs
#     through MatMulNBits' GEMV, a prompt through MatMulIntegerToFloat, from one copy of the bytes;
#     --embedding-int8: the token table in int8, which the float LM head reads at decode too),
#     accuracy against FP32, prefill latency, decode (time to first token, ms/token, tokens/s),
#     and a `graphpass generate` sample from the quantized graph beside FP32's.
#  2. The no-cache export: each W8A8 scheme against FP32, the comparison table and the report.
# Usage: bash tools/main_job.sh [OUT_DIR]   (default: out/)
#        SCHEMES="token dynamic static" for more no-cache schemes (default: token).
set -euo pipefail
OUT=${1:-out}
SCHEMES=${SCHEMES:-"token"}
P=$OUT/smollm2_optimum
M=$OUT/smollm2
mkdir -p "$OUT"

echo "== with-past SmolLM2 (optimum-onnx form)"
[ -f "$P/model.onnx" ] || python models/smollm2_optimum.py --out "$P"
graphpass data --play othello --tokenizer "$P/tokenizer.json" --model "$P/model.onnx" --seq-len 512 --samples 32 -o "$OUT/calib-past.npz"
graphpass data --play hamlet  --tokenizer "$P/tokenizer.json" --model "$P/model.onnx" --seq-len 512 --samples 16 -o "$OUT/eval-past.npz"
graphpass quantize "$P/model.onnx" -o "$OUT/past-token.onnx" --data "$OUT/calib-past.npz" --scheme token --decode-fusions \
  --decode-route --embedding-int8 --alpha auto --report "$OUT/quantize-past-token.json"
graphpass eval "$OUT/past-token.onnx" --reference "$P/model.onnx" --data "$OUT/eval-past.npz" --json "$OUT/eval-past-token.json"
graphpass bench "$OUT/past-token.onnx" --reference "$P/model.onnx" --shape 1x512 --json "$OUT/bench-past-token.json"
graphpass bench "$OUT/past-token.onnx" --reference "$P/model.onnx" --decode --prompt-len 256 --steps 64 \
  --data "$OUT/eval-past.npz" --json "$OUT/decode-past-token.json"
graphpass generate "$OUT/past-token.onnx" --tokenizer "$P/tokenizer.json" --reference "$P/model.onnx" \
  --max-new-tokens 48 --prompt "HAMLET. To be, or not to be, that is the question:"

echo "== no-cache SmolLM2 (dynamo export)"
[ -f "$M/model.onnx" ] || python models/smollm2.py --out "$M"
graphpass data --play othello --tokenizer "$M/tokenizer.json" --seq-len 512 --samples 32 -o "$OUT/calib.npz"
graphpass data --play hamlet  --tokenizer "$M/tokenizer.json" --seq-len 512 --samples 16 -o "$OUT/eval.npz"
for S in $SCHEMES; do
  echo "== scheme $S"
  graphpass quantize "$M/model.onnx" -o "$OUT/smollm2-$S.onnx" --data "$OUT/calib.npz" --scheme "$S" \
    --alpha auto --report "$OUT/quantize-$S.json"
  graphpass eval "$OUT/smollm2-$S.onnx" --reference "$M/model.onnx" --data "$OUT/eval.npz" --json "$OUT/eval-$S.json"
  graphpass bench "$OUT/smollm2-$S.onnx" --reference "$M/model.onnx" --shape 1x512 --shape 1x32 --json "$OUT/bench-$S.json"
done
python tools/summarize.py "$OUT" $SCHEMES
# The report for the built-in default (token; the first scheme run when token is not among them):
# one self-contained HTML page, plots also as PNG in report_files/. The stats file makes the
# per-channel plots use the very scales quantize folded.
R=token; case " $SCHEMES " in *" token "*) ;; *) R=${SCHEMES%% *} ;; esac
graphpass calibrate "$M/model.onnx" --data "$OUT/calib.npz" -o "$OUT/stats.npz"
graphpass report "$M/model.onnx" "$OUT/smollm2-$R.onnx" --data "$OUT/eval.npz" -o "$OUT/report.html" \
  --stats "$OUT/stats.npz" --quantize-report "$OUT/quantize-$R.json" \
  --eval-json "$OUT/eval-$R.json" --bench-json "$OUT/bench-$R.json" --title "SmolLM2-135M, W8A8 $R, against FP32"
echo "report ($R): $OUT/report.html (open it in a browser; plots also in $OUT/report_files/)"
