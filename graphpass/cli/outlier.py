"""Options of `graphpass quantize --scheme outlier` (float outlier columns + int8, passes/outlier.py)."""
from __future__ import annotations

import argparse
from dataclasses import replace

from graphpass.errors import GraphpassError


def add_outlier_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("scheme outlier (LLM.int8(): outlier input columns in float, the rest int8 per token)")
    g.add_argument("--outlier-threshold", type=float, metavar="T",
                   help="float columns: calibrated max|x_j| > T after smoothing (default 6.0; with --alpha auto, "
                        "searched per site among T, 2T, 4T, 8T and none)")
    g.add_argument("--outlier-topk", type=int, metavar="K", help="float columns: the K largest max|x_j| per layer")
    g.add_argument("--outlier-fraction", type=float, metavar="F",
                   help="float columns: the largest fraction F of the columns per layer")
    g.add_argument("--outlier-two-digit", metavar="KINDS",
                   help="site kinds (comma-separated: glu, attn, rmsnorm, layernorm; 'none') whose int8 "
                        "activations take two int8 digits, one more int8 product each (default glu: the "
                        "down_proj inputs, of the first half of the layers: --outlier-two-digit-first)")
    g.add_argument("--outlier-two-digit-first", type=float, metavar="F",
                   help="two digits only on the first share F of those sites in graph order (the earliest "
                        "layers; default 0.5; 1: all)")
    g.add_argument("--outlier-slack", type=float, metavar="S",
                   help="--alpha auto: the fewest float columns whose error is within (1 + S) x the site's best "
                        "(default 0.1)")


def with_outlier(cfg, a: argparse.Namespace):
    """The pipeline config with the outlier options (an error if they are given to another scheme)."""
    from graphpass.passes.outlier import OutlierConfig

    given = {k: v for k, v in (("threshold", a.outlier_threshold), ("topk", a.outlier_topk),
                               ("fraction", a.outlier_fraction), ("slack", a.outlier_slack),
                               ("two_digit", _kinds(a.outlier_two_digit)),
                               ("two_digit_first", a.outlier_two_digit_first)) if v is not None}
    if cfg.scheme != "outlier":
        if given:
            raise GraphpassError("--outlier-threshold / -topk / -fraction / -slack / -two-digit[-first] apply "
                                 "to --scheme outlier")
        return cfg
    if "threshold" in given and ("topk" in given or "fraction" in given):
        raise GraphpassError("--outlier-threshold has no effect with --outlier-topk / -fraction: give one of them")
    if "slack" in given and (cfg.alpha != "auto" or "topk" in given or "fraction" in given):
        raise GraphpassError("--outlier-slack applies to the threshold search (--alpha auto without "
                             "--outlier-topk / -fraction)")
    return replace(cfg, outlier=OutlierConfig(**given))


def _kinds(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(k for k in (t.strip() for t in text.split(",")) if k and k != "none")
