"""Subcommand quantize: calibrate -> smooth -> W8A8 in one go."""
from __future__ import annotations

import argparse
import json
import math

from graphpass.cli.common import OVERWRITE_HELP
from graphpass.cli.nbits import add_nbits_args, with_nbits
from graphpass.cli.outlier import add_outlier_args, with_outlier
from graphpass.errors import GraphpassError


def _alpha(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor 'auto'") from None


def _cmd_quantize(a: argparse.Namespace) -> None:
    from graphpass.cli.common import check_output, site_alpha
    from graphpass.calibrate.data import load_data
    from graphpass.graph.io import write_text
    from graphpass.pipeline import PipelineConfig, needs_calibration, quantize

    check_output(a.model, a.output, a.overwrite, also=(a.report,) if a.report else ())
    cfg = PipelineConfig(scheme=a.scheme, alpha=None if a.no_smooth else a.alpha,
                         site_alpha=site_alpha(a.site_alpha), lm_head=a.lm_head,
                         embedding_int8=a.embedding_int8, skip=tuple(a.skip or ()),
                         simplify_attention=not a.keep_attention, attention_chunks=a.attention_chunks,
                         batch_size=a.batch_size, threads=a.threads, decode_steps=a.decode_steps,
                         decode_fusions=a.decode_fusions, kv_cache=a.kv_cache, kv_fold=not a.kv_no_fold,
                         kv_scales=a.kv_scales, kv_smooth=a.kv_smooth,
                         decode_route=a.decode_route)
    cfg = with_outlier(with_nbits(cfg, a), a)   # w8 / w4, outlier options
    if a.data is None and needs_calibration(cfg):
        if cfg.scheme in ("static", "outlier"):
            raise GraphpassError(f"--scheme {cfg.scheme} calibrates its activations: give --data DATA.npz")
        raise GraphpassError(f"--data DATA.npz is needed for smoothing (or pass --no-smooth: --scheme "
                             f"{cfg.scheme} then runs without data)")
    data = load_data(a.data) if a.data else None
    bres = None
    if a.max_kl is not None or a.max_ppl_increase is not None:
        res, bres = _quantize_budget(a, cfg, data)
    else:
        if a.holdout:
            raise GraphpassError("--holdout is only used with --max-kl / --max-ppl-increase")
        res = quantize(a.model, a.output, data, cfg)
        print(res.format())
    if a.report:
        rep = {"steps": [{"step": n, "seconds": s, "summary": w} for n, s, w in res.steps],
               "quantized": res.quant.quantized, "kept_float": res.quant.skipped,
               "alphas": res.alphas, "size_before": res.size_before, "size_after": res.size_after,
               "smoothing": res.smooth.rows if res.smooth else []}
        if res.thresholds:      # scheme outlier: max|x| above which a site's columns go float (null: none)
            rep["outlier_thresholds"] = {k: (t if math.isfinite(t) else None) for k, t in res.thresholds.items()}
            rep["two_digit"] = list(getattr(res.quant, "two_digit", []))
        if bres is not None:
            rep["budget"] = bres.to_json()
        write_text(a.report, json.dumps(rep, indent=2) + "\n")


def _quantize_budget(a: argparse.Namespace, cfg, data):
    """--max-kl / --max-ppl-increase: graphpass.budget (held-out measure, layers back to float)."""
    import sys

    from graphpass.search.budget import Budget, quantize_within_budget
    from graphpass.calibrate.data import load_data

    if data is None:
        raise GraphpassError("an accuracy budget needs --data (calibration samples, and held-out "
                             "ones unless --holdout is given)")
    budget = Budget(a.max_kl, a.max_ppl_increase)
    holdout = load_data(a.holdout) if a.holdout else None
    res, bres = quantize_within_budget(a.model, a.output, data, cfg, budget, holdout,
                                       order_by=a.fallback_order, bench_seconds=a.bench_seconds)
    print(res.format())
    print(bres.format())
    if not bres.met:
        r = bres.reached
        print(f"graphpass quantize: warning: budget {budget.describe()} not reached even with "
              f"{len(bres.kept_float)} layers in float (KL {r.get('kl', float('nan')):.5f}); wrote the "
              "graph closest to it", file=sys.stderr)
    return res, bres


def add_parsers(sub, positive) -> None:
    q = sub.add_parser("quantize", help="calibrate, smooth and quantize to W8A8")
    q.add_argument("model")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--data", help="calibration inputs (.npz)")
    q.add_argument("--scheme", choices=["static", "dynamic", "token", "w8", "w4", "outlier", "none"], default="token",
                   help="activation quantization: per tensor static / dynamic, or per token; outlier: per "
                        "token with the calibrated outlier columns in float (LLM.int8()); none: weights "
                        "stay float (with --no-smooth --kv-cache int8)")
    q.add_argument("--alpha", type=_alpha, default="auto",
                   help="smoothing strength in [0, 1], or 'auto' to search it per site (default)")
    q.add_argument("--no-smooth", action="store_true", help="quantize without SmoothQuant")
    q.add_argument("--site-alpha", action="append", metavar="SITE=ALPHA")
    q.add_argument("--lm-head", action="store_true", help="quantize the LM head's activation too")
    q.add_argument("--embedding-int8", action="store_true",
                   help="store the token table in int8 (a tied LM head reads it through DequantizeLinear)")
    q.add_argument("--skip", action="append", metavar="PATTERN", help="keep matching layers in float")
    q.add_argument("--keep-attention", action="store_true",
                   help="keep the exported attention as is (by default softmax NaN guards are dropped where "
                        "provably inert and causal attention skips its masked half)")
    q.add_argument("--attention-chunks", type=positive(int), default=3, metavar="N",
                   help="causal attention: N query chunks, each reading only the keys it sees (1: off)")
    q.add_argument("--batch-size", type=positive(int), default=1)
    q.add_argument("--decode-route", action="store_true",
                   help="with --decode-fusions (--scheme token, w8 or w4): one top-level If on the new-token "
                        "count; one token runs attention over the concatenated cache (and, with token, the "
                        "int8 weights through MatMulNBits), several tokens the graph as it was (the bytes "
                        "stored once)")
    q.add_argument("--decode-fusions", action="store_true",
                   help="with-past graphs: attention with its cache -> GroupQueryAttention + RotaryEmbedding, "
                        "residual + RMSNorm -> SkipSimplifiedLayerNormalization, row rescales folded "
                        "(exact; onnxruntime's CPU kernel then refuses batch > 1 with both a past and "
                        "more than one new token)")
    q.add_argument("--decode-steps", type=int, default=4, metavar="K",
                   help="with-past graphs: calibrate each window as a prefill plus K one-token decode "
                        "steps against the cache (0: prefill only)")
    q.add_argument("--kv-cache", choices=["int8"],
                   help="with-past graphs: store past/present in int8 with static per-(head, channel) "
                        "scales calibrated on --data over prefill and decode steps")
    q.add_argument("--kv-no-fold", action="store_true",
                   help="int8 cache in decomposed attention: dequantize the cache (Cast, Mul) instead of "
                        "folding the scales into the query and the output")
    q.add_argument("--kv-scales", choices=["channel", "head"], default="channel",
                   help="int8 cache: one scale per (kv head, channel) (default) or per kv head")
    q.add_argument("--kv-smooth", type=float, metavar="ALPHA",
                   help="int8 cache: move key-channel ranges into the query through the q/k projection "
                        "weights, strength ALPHA in [0, 1] (exact in float; RoPE pairs share a factor); "
                        "useful with --kv-scales head")
    q.add_argument("--threads", type=positive(int), default=2)
    q.add_argument("--max-kl", type=float, metavar="X",
                   help="accuracy budget: KL(FP32 || int8) on held-out data; over it, the most "
                        "sensitive layers go back to float")
    q.add_argument("--max-ppl-increase", type=float, metavar="P",
                   help="accuracy budget for causal LMs: perplexity increase as a fraction (0.01 = +1%%)")
    q.add_argument("--holdout", metavar="HELD.npz",
                   help="held-out inputs for the budget (default: the last quarter of --data)")
    q.add_argument("--fallback-order", choices=["layer", "sqnr"], default="layer",
                   help="budget: layers go to float worst first by the SQNR of the layer alone (default) "
                        "or at its output (which also counts the error of every layer before it)")
    q.add_argument("--bench-seconds", type=float, default=2.0,
                   help="budget: timing at 1x512 of the plain and the written graph (0: skip)")
    q.add_argument("--report", help="write a JSON summary")
    q.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP)
    add_nbits_args(q)   # w8 / w4 options
    add_outlier_args(q)
    q.set_defaults(func=_cmd_quantize)
