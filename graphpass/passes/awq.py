"""AWQ, folded: per site Y_k = X·W_k = (X·diag(s)^-1)·(diag(s)·W_k), s from search/awq.py,
then each reader's weight clipped per output channel and block (passes/clip.py, ρ from
search/clip.py) before MatMulNBits packs it.

The fold is the smoothing fold (passes/smooth.fold_site) for every site kind: norms (γ, β /= s),
SwiGLU up -> down and linear -> linear (producer columns /= s), v -> o with grouped-query attention
(value columns /= s through the head map). No runtime op is added. Clipping changes the weights
(it is the one inexact step, by design); the fold alone leaves every output unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphpass.calibrate.stats import Stats
from graphpass.match.sites import Analysis
from graphpass.passes.clip import clip_blocks
from graphpass.passes.nbits import NBitsConfig, layer_config
from graphpass.passes.smooth import fold_site
from graphpass.search.awq import SiteChoice, search_awq
from graphpass.search.blas import heap_scratch, one_blas_thread
from graphpass.search.clip import search_clip

CLIP_ROWS = 64     # sampled rows the clipping search scores per site (evenly thinned)
CLIP_SCRATCH = 1 << 20   # heap blocks up to 1 MB while clipping: the search's column chunks fit, the
                         # clipped weights (kept) stay mmapped and do not fragment the heap


@dataclass
class AwqReport:
    choices: dict[str, SiteChoice] = field(default_factory=dict)
    clip: list[dict] = field(default_factory=list)     # per reader: name, error before / after, mean ρ

    def summary(self) -> str:
        forms: dict[str, int] = {}
        for ch in self.choices.values():
            forms[ch.choice.form] = forms.get(ch.choice.form, 0) + 1
        gain = np.median([ch.gain for ch in self.choices.values()]) if self.choices else 1.0
        text = (f"{len(self.choices)} sites scaled ({', '.join(f'{k} {v}' for k, v in sorted(forms.items()))}), "
                f"median error RTN / AWQ {gain:.2f}x")
        if self.clip:
            before = sum(r["before"] for r in self.clip)
            after = sum(r["after"] for r in self.clip)
            text += f"; {len(self.clip)} weights clipped, block error x{after / max(before, 1e-30):.2f}"
        return text


def awq(an: Analysis, stats: Stats, cfg: NBitsConfig, smoothing: float | str | None = None,
        clip: bool = True, progress: bool = True, apply_clip: bool = True) -> AwqReport:
    """Search and fold the AWQ scales of every site with sampled rows, then clip its readers
    (apply_clip=False: the ratios are searched and recorded, the weights left for GPTQ)."""
    rep = AwqReport(choices=search_awq(an, stats, cfg, smoothing, progress))
    g, c = an.graph, an.consts
    for site in an.sites:
        ch = rep.choices.get(site.name)
        if ch is not None:
            fold_site(g, c, site, ch.scales)
    if clip:
        with one_blas_thread(), heap_scratch(CLIP_SCRATCH):
            clip_readers(an, stats, cfg, rep, progress, apply_clip)
    g.toposort()
    return rep


def clip_readers(an: Analysis, stats: Stats, cfg: NBitsConfig, rep: AwqReport, progress: bool = True,
                 apply: bool = True) -> None:
    """Each scaled site's readers: ρ per block and channel from the rows X / s, then W clipped
    (apply=False: W kept, ρ only recorded in rep.clip, for GPTQ's block scales)."""
    from graphpass.progress import bar
    from graphpass.search.pool import ordered_map

    c = an.consts

    def readers():              # (linear, rows X / s, weight, its config): graph reads in this thread
        for site in bar([s for s in an.sites if s.name in rep.choices], "clip search", "site", enabled=progress):
            x = stats.rows[site.act]
            x = x[::-(-len(x) // CLIP_ROWS)].astype(np.float32) / rep.choices[site.name].scales
            for lin in site.consumers:
                lcfg = layer_config(lin, c, cfg)
                if lcfg is not None:      # a head kept in float is not rounded: clipping would only cost
                    yield lin, x, lin.weight(c).astype(np.float32), lcfg

    for (lin, _, w, lcfg), (ratio, before, after) in ordered_map(lambda r: r[1:], search_clip, readers()):
        if apply:
            lin.set_weight(c, clip_blocks(w, ratio, lcfg.block_size, lcfg.symmetric))
        rep.clip.append(dict(linear=lin.name, before=before, after=after, mean_ratio=float(ratio.mean()),
                             ratio=ratio))
