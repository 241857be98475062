"""GPTQ rounding of every N-bit linear layer, after the AWQ fold: codes that MatMulNBits stores.

Readers of one input X share H = 2/R · X'^T·X' (X' = X / s after the site's AWQ scale s, s = 1
elsewhere), so they are rounded together: W = [W_1 | W_2 | ..] [K, ΣN_k] (columns quantize
independently; only the rows interact), by search/gptq.gptq_round on each layer's grid
(passes/nbits.layer_config), with the clip ratios ρ of the clip search as block scale factors
instead of clipped weights (the clipped tail is then compensated like any other rounding error).
Each reader's float weight becomes its dequantized W_q, and the returned codes are packed as they
are (passes/nbits_codes.pack_codes) instead of re-rounded by onnxruntime's packer.
Left to round-to-nearest: the LM head (its table is also the token lookup, whose rows GPTQ would
move by more than a rounding step), layers `nbits` skips, and inputs with no Gram in the stats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.errors import GraphpassError
from graphpass.match.sites import Analysis
from graphpass.passes.clip import clip_blocks
from graphpass.passes.nbits import NBitsConfig, Packed, _skip_reason, layer_config
from graphpass.passes.nbits_codes import pack_codes
from graphpass.passes.quantize import is_lm_head
from graphpass.search.blas import heap_scratch, one_blas_thread
from graphpass.search.pool import ordered_map
from graphpass.search.gptq import GptqConfig, gptq_round, hessian
from graphpass.search.nbits_alpha import fake_quant_weight_blocks


SCRATCH = 2 << 20    # heap blocks up to 2 MB while rounding: a lazy batch's per-channel updates
                     # (128 x up to 3,072 float32) are reused instead of fresh zero-filled mmaps;
                     # the rounded weights (kept) stay mmapped


@dataclass
class GptqReport:
    packed: dict[str, Packed] = field(default_factory=dict)    # linear name -> what MatMulNBits stores
    rows: list[dict] = field(default_factory=list)             # per input: readers, H-weighted error RTN / GPTQ

    def summary(self) -> str:
        rtn = sum(r["rtn"] for r in self.rows)
        got = sum(r["gptq"] for r in self.rows)
        return (f"{len(self.packed)} layers rounded by GPTQ over {len(self.rows)} inputs, "
                f"Hessian-weighted error GPTQ / RTN x{got / max(rtn, 1e-30):.2f}")


def groups(an: Analysis, cfg: NBitsConfig, scales: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray | None, list]]:
    """(stats tensor, AWQ scale or None, readers) per input GPTQ rounds; site readers under the
    site's tensor (a folded norm may have moved them to a clone), other layers under their input."""
    c, seen, out = an.consts, set(), []
    for site in an.sites:
        out.append((site.act, scales.get(site.name), list(site.consumers)))
        seen |= {lin.name for lin in site.consumers}
    by_act: dict[str, list] = {}
    for lin in an.linears:
        if lin.name not in seen:
            by_act.setdefault(lin.act, []).append(lin)
    out += [(t, None, lins) for t, lins in by_act.items()]
    keep = lambda lin: (layer_config(lin, c, cfg) is not None and not _skip_reason(lin, c, cfg)  # noqa: E731
                        and not is_lm_head(lin, c) and lin.node.op == "MatMul")
    return [(t, s, [lin for lin in lins if keep(lin)]) for t, s, lins in out if any(keep(lin) for lin in lins)]


def gptq(an: Analysis, stats: Stats, cfg: NBitsConfig, scales: dict[str, np.ndarray] | None = None,
         ratios: dict[str, np.ndarray] | None = None, progress: bool = True,
         how: GptqConfig = GptqConfig()) -> GptqReport:
    """Round every eligible reader by GPTQ; `scales`: AWQ's s per site name, `ratios`: ρ per linear.
    Weights are read in this thread; each input's Gram (S^T·S from the spilled rows) and the
    rounding run on both cores (search/pool.py). Readers of one input on one block grid are
    rounded in one call whatever their bits (--w4-keep-8bit): one Gram and one factorization per input."""
    from graphpass.progress import bar

    if not stats.gram:
        raise GraphpassError("GPTQ needs X^T·X per input from calibration (calibrate with gram_step > 0)")
    rep, c, ratios = GptqReport(), an.consts, ratios or {}
    items = [(t, s, part) for t, s, lins in groups(an, cfg, scales or {}) if t in stats.gram
             for part in _by_grid(lins, c, cfg)]

    def prepare(item):
        t, s, part = item
        ws = [lin.weight(c).astype(np.float32) for lin, _ in part]
        kb = -(-ws[0].shape[0] // part[0][1].block_size)
        rho = np.concatenate([ratios.get(lin.name, np.ones((kb, w.shape[1]), np.float32))
                              for (lin, _), w in zip(part, ws)], 1)
        return stats.gram, t, s, ws, rho, [lcfg for _, lcfg in part], how

    with one_blas_thread(), heap_scratch(SCRATCH):
        for (_, _, part), (ws, r, row) in ordered_map(prepare, _round_group,
                                                    bar(items, "GPTQ", "weight group", enabled=progress)):
            rep.rows.append(dict(readers=[lin.name for lin, _ in part], **row))
            for (lin, lcfg), cols in zip(part, _columns(ws)):
                zp = None if r.zero_points is None else r.zero_points[cols]
                rep.packed[lin.name] = pack_codes(r.codes[:, cols], r.scales[cols], zp, lcfg.bits, lcfg.block_size)
                lin.set_weight(c, np.ascontiguousarray(r.dequantized[:, cols]))
    return rep


def _by_grid(lins: list, c, cfg: NBitsConfig) -> list[list[tuple]]:
    """The readers as (linear, its config) in parts of one block size and symmetry (bits may differ)."""
    out: dict[tuple, list] = {}
    for lin in lins:
        lcfg = layer_config(lin, c, cfg)
        out.setdefault((lcfg.block_size, lcfg.symmetric), []).append((lin, lcfg))
    return list(out.values())


def _round_group(grams, t: str, s, ws: list, rho: np.ndarray, cfgs: list[NBitsConfig], how: GptqConfig):
    """(ws, GPTQ's Rounded, H-weighted errors of clipped RTN and GPTQ) for readers ws of input t,
    each on its own grid cfgs[i] (one block size and symmetry, bits per reader)."""
    h = hessian(grams[t], grams.rows[t], s)
    w = np.concatenate(ws, 1)
    bits = np.concatenate([np.full(wi.shape[1], lcfg.bits) for wi, lcfg in zip(ws, cfgs)])
    block, symmetric = cfgs[0].block_size, cfgs[0].symmetric
    r = gptq_round(w, h, bits, block, symmetric, rho, how.damp, how.act_order)
    rtn = np.empty_like(w)
    for wi, lcfg, cols in zip(ws, cfgs, _columns(ws)):
        rtn[:, cols] = fake_quant_weight_blocks(clip_blocks(wi, rho[:, cols], block, symmetric), lcfg)
    return ws, r, dict(rtn=_h_error(w - rtn, h.astype(np.float32)), gptq=r.h_error)


def _columns(ws: list) -> list[slice]:
    """Each reader's columns in the concatenation [W_1 | ... | W_n] that GPTQ rounds in one call."""
    ends = np.cumsum([wi.shape[1] for wi in ws]).tolist()
    return [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]


def _h_error(d: np.ndarray, h: np.ndarray) -> float:
    """tr(D^T·H·D): the calibration output error of a weight error D [K, N] (up to the factor 2/R);
    a report, so float32 products, summed in float64."""
    d = d.astype(np.float32)
    return float(np.einsum("kn,kn->", d, h @ d, dtype=np.float64))
