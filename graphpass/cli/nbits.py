"""Options of `graphpass quantize --scheme w8 / w4` (weight-only MatMulNBits, passes/nbits.py)."""
from __future__ import annotations

import argparse
from dataclasses import replace

from graphpass.errors import GraphpassError


def add_nbits_args(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("weight-only schemes w8 / w4 (com.microsoft MatMulNBits)")
    g.add_argument("--bits", type=int, choices=[4, 8], help="weight bits (default: 8 for w8, 4 for w4)")
    g.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="block of input channels sharing one scale (default: 32 for w8, 128 for w4)")
    g.add_argument("--accuracy-level", type=int, choices=[0, 4], default=4,
                   help="4: the kernel quantizes activations to int8 per block (VNNI); 0: float compute")
    g.add_argument("--asymmetric", action="store_true", help="a zero point per block (default symmetric)")
    g.add_argument("--float-head", action="store_true",
                   help="keep the LM head (and a tied token table) in float")
    g.add_argument("--head-bits", type=int, choices=[4, 8],
                   help="the LM head (and a tied token table) in these bits (default: the scheme's); "
                        "w4 --head-bits 8 keeps most of the float head's accuracy at 0.18x the size")
    g.add_argument("--head-block-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="the LM head (and a tied token table) in blocks of this size (default: --block-size); "
                        "the head's input is rounded to int8 per block at accuracy level 4, which costs "
                        "more at the head than in the body: w8 --block-size 128 --head-block-size 32")
    g.add_argument("--layer-block-size", action="append", default=[], metavar="PATTERN=SIZE",
                   help="layers whose name matches the fnmatch PATTERN in blocks of SIZE (repeatable, the first "
                        "match wins; e.g. '*down_proj*=128'); the AWQ / alpha searches score each layer in its own "
                        "blocks")
    g.add_argument("--no-awq", action="store_true",
                   help="plain round-to-nearest. By default, with --data, AWQ searches per site a scale "
                        "s = mean|x|^r or mean|x|^r / max|w|^(1-r) (r in 0..0.95 by 0.05; with smoothing on, "
                        "also SmoothQuant's max|x|^a / max|w|^(1-a)) by the error of the site's MatMulNBits "
                        "outputs on sampled calibration rows, folds it exactly into the producer (norm, "
                        "up_proj, v_proj, linear), then a clipping ratio (1.0..0.55) per output channel and block")
    g.add_argument("--no-clip", action="store_true", help="AWQ scales without the clipping search")
    gptq = g.add_mutually_exclusive_group()
    gptq.add_argument("--gptq", dest="gptq", action="store_true", default=None,
                      help="GPTQ rounding after the AWQ fold: each input channel's rounding error is compensated "
                           "in the channels not yet rounded, from X^T·X summed during calibration (the clip "
                           "ratios become block scale factors). Off by default: on SmolLM2-135M it doubles the CPU time "
                           "(165 against 79 CPU s); there it takes w4 block 128 from 1.24x to 1.12x FP32 perplexity, "
                           "1.09x with --w4-keep-8bit 50")
    gptq.add_argument("--no-gptq", dest="gptq", action="store_false", help="round to nearest after AWQ (the default)")
    g.add_argument("--gptq-order", choices=["act", "natural"], default="act",
                   help="GPTQ's channel order: 'act' (default) fixes every block's scale from the weight before "
                        "rounding and rounds input channels by decreasing diag(X^T·X); 'natural' rounds them in "
                        "order, each block's scale taken from the weights as GPTQ has updated them")
    g.add_argument("--gptq-damp", type=float, default=None, metavar="L",
                   help="GPTQ adds L * mean(diag(X^T·X)) to the Hessian's diagonal (default 0.1)")
    g.add_argument("--w4-keep-8bit", type=int, default=0, metavar="N",
                   help="w4: keep the N linear layers of largest 4-bit output error on calibration rows "
                        "in 8 bits (each costs K*N/2 bytes more, K padded to whole blocks); ranked by the "
                        "round-to-nearest error before AWQ, with --gptq too")


def _layer_block(text: str) -> tuple[str, int]:
    pattern, _, size = text.rpartition("=")
    if not pattern or not size.isdigit():
        raise GraphpassError(f"--layer-block-size takes PATTERN=SIZE (e.g. '*down_proj*=128'), got '{text}'")
    return pattern, int(size)


def _gptq_how(a: argparse.Namespace):
    from graphpass.search.gptq import DAMP, GptqConfig

    damp = DAMP if a.gptq_damp is None else a.gptq_damp
    if not 0.0 < damp <= 10.0:
        raise GraphpassError(f"--gptq-damp must lie in (0, 10], got {a.gptq_damp}")
    return GptqConfig(act_order=a.gptq_order == "act", damp=damp)


def with_nbits(cfg, a: argparse.Namespace):
    """The pipeline config with the MatMulNBits options for w8 / w4 (unchanged for other schemes)."""
    from graphpass.passes.nbits import DEFAULT_BLOCK, NBITS_SCHEMES, NBitsConfig

    if cfg.scheme not in NBITS_SCHEMES:
        if (a.bits is not None or a.block_size is not None or a.asymmetric or a.float_head or a.no_awq
                or a.no_clip or a.head_bits is not None or a.head_block_size is not None or a.layer_block_size
                or a.gptq is not None or a.w4_keep_8bit or a.gptq_order != "act" or a.gptq_damp is not None):
            raise GraphpassError("--bits, --block-size, --asymmetric, --float-head, --head-bits, --head-block-size, "
                                 "--layer-block-size, --no-awq, --no-clip, --gptq / --no-gptq, --gptq-order, --gptq-damp and "
                                 "--w4-keep-8bit "
                                 "apply to --scheme w8 / w4")
        return cfg
    bits = NBITS_SCHEMES[cfg.scheme]
    if a.bits is not None and a.bits != bits:
        raise GraphpassError(f"--scheme {cfg.scheme} is {bits}-bit, but --bits {a.bits} was given")
    if a.float_head and (a.head_bits is not None or a.head_block_size is not None):
        raise GraphpassError("--float-head and --head-bits / --head-block-size contradict each other: choose one")
    nb = NBitsConfig(bits=bits, block_size=a.block_size or DEFAULT_BLOCK[bits], accuracy_level=a.accuracy_level,
                     symmetric=not a.asymmetric, lm_head=not a.float_head, skip=cfg.skip,
                     head_bits=a.head_bits, head_block_size=a.head_block_size,
                     layer_blocks=tuple(_layer_block(t) for t in a.layer_block_size))
    return replace(cfg, nbits=nb, awq=not a.no_awq, awq_clip=not a.no_clip, gptq=a.gptq,
                   keep_8bit=a.w4_keep_8bit, gptq_how=_gptq_how(a))   # --alpha auto: searched on MatMulNBits arithmetic (search/nbits_alpha.py)
