#!/usr/bin/env bash
# The main job on the built-in default: SmolLM2-135M-Instruct, calibrated on Othello (32 x 512
# tokens), evaluated on Hamlet (16 x 512): export, quantize with each scheme (SmoothQuant with
# per-site alpha), evaluate and time against FP32, print the comparison.
# Usage: bash tools/main_job.sh [OUT_DIR]   (default: out/)     SCHEMES="token" to run fewer.
set -euo pipefail
OUT=${1:-out}
SCHEMES=${SCHEMES:-"token dynamic static"}
M=$OUT/smollm2
mkdir -p "$M"
if [ ! -f "$M/model.onnx" ]; then
  python models/smollm2.py --out "$M"
fi
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
