"""calibrate -> (alpha search) -> smooth -> quantize -> check -> save, each step timed and logged.

Ranges after smoothing need no second calibration: a smoothed input X' = X·diag(s)^-1 has the
per-tensor range [min_j(min_j / s_j), max_j(max_j / s_j)] from the per-channel stats of X.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


from graphpass.errors import GraphpassError
from graphpass.graph.gs_io import import_graph
from graphpass.graph.io import externalized, load_model, model_size, save_graph
from graphpass.passes.attention import drop_softmax_nan_guards
from graphpass.passes.causal import split_causal_attention
from graphpass.passes.decode import fuse_decode_graph
from graphpass.calibrate.data import as_data
from graphpass.calibrate.gram import GRAM_STEP
from graphpass.calibrate.kv import cache_absmax, cache_scales
from graphpass.passes.kv_cache import KV_CACHE_TYPES, quantize_kv_cache
from graphpass.passes.decode_route import route_decode
from graphpass.passes.quantize import QuantConfig, QuantReport
from graphpass.passes.quantize import quantize as quantize_pass
from graphpass.passes.smooth import SmoothConfig, SmoothReport
from graphpass.passes.nbits import NBitsConfig, nbits_or
from graphpass.passes.outlier import OutlierConfig, calibrated_columns, split_outliers, two_digit_layers
from graphpass.passes.sidecars import copy_sidecars
from graphpass.passes.smooth import smooth as smooth_pass
from graphpass.match.sites import analyze
from graphpass.search.gptq import GptqConfig
from graphpass.passes.smooth_checked import check_alpha


NO_FOLD_GQA = ("--kv-no-fold has no effect on GroupQueryAttention, whose kernel reads the int8 cache "
               "with its scales itself")


@dataclass(frozen=True)
class PipelineConfig:
    scheme: str = "token"
    alpha: float | str | None = 0.5             # a number, "auto", or None for no smoothing
    site_alpha: tuple[tuple[str, float], ...] = ()
    lm_head: bool = False
    embedding_int8: bool = False
    skip: tuple[str, ...] = ()
    simplify_attention: bool = True             # drop softmax NaN guards of causal masks
    attention_chunks: int = 3                   # causal attention in query chunks (< 2: off)
    batch_size: int = 1
    threads: int = 2
    row_step: int = 64                          # alpha search samples every row_step-th token
    decode_steps: int = 4                       # with-past graphs: decode steps per calibration window
    decode_fusions: bool = False                # attention with a KV cache -> GroupQueryAttention, ...
    nbits: NBitsConfig | None = None            # w8 / w4: MatMulNBits options (None: the scheme's defaults)
    kv_cache: str | None = None                 # with-past graphs: "int8" cache (passes/kv_cache.py)
    kv_fold: bool = True                        # int8 cache: scales folded into query / output
    kv_scales: str = "channel"                  # int8 cache scales per (head, channel) or per head
    kv_smooth: float | None = None              # key-channel smoothing strength (None: off)
    outlier: OutlierConfig = OutlierConfig()    # scheme outlier: which columns stay in float
    outlier_thresholds: tuple[tuple[str, float], ...] = ()   # per site, searched earlier (budget re-runs)
    decode_route: bool = False                  # decode fusions: one top-level If, one token on its own kernels
    awq: bool = True                            # w8 / w4 with data: AWQ scales (smoothing α joins their grid)
    awq_clip: bool = True                       # ... and the clipping search per channel and block
    gptq: bool | None = None                    # w8 / w4: GPTQ rounding (passes/gptq.py) after AWQ; None: off
    keep_8bit: int = 0                          # w4 with data: this many most sensitive layers in 8 bits
    gptq_how: GptqConfig = GptqConfig()         # GPTQ's channel order and damping


    def __post_init__(self):
        if self.scheme != "none":               # "none": weights stay float (e.g. only --kv-cache)
            QuantConfig(scheme=self.scheme)     # validates the scheme
        if self.kv_cache not in (None, *KV_CACHE_TYPES):
            raise GraphpassError(f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}, got '{self.kv_cache}'")
        if not self.kv_cache and (self.kv_smooth is not None or self.kv_scales != "channel" or not self.kv_fold):
            raise GraphpassError("--kv-smooth, --kv-scales and --kv-no-fold go with --kv-cache int8")
        if self.scheme == "none" and (self.alpha is not None or not self.kv_cache):
            raise GraphpassError("--scheme none quantizes no weight: use it with --no-smooth and --kv-cache")
        if self.kv_smooth is not None and not 0.0 <= self.kv_smooth <= 1.0:   # before the cache is calibrated
            raise GraphpassError(f"--kv-smooth must lie in [0, 1], got {self.kv_smooth}")
        if self.scheme == "none" and (self.lm_head or self.embedding_int8 or self.skip):
            raise GraphpassError("--lm-head, --embedding-int8 and --skip choose weights to quantize: "
                                 "--scheme none quantizes none")
        if self.scheme == "outlier" and self.embedding_int8:
            raise GraphpassError("--embedding-int8 is not supported with --scheme outlier")
        if self.decode_steps < 0:
            raise GraphpassError(f"--decode-steps must be >= 0, got {self.decode_steps}")
        if self.alpha is not None and self.alpha != "auto":
            if isinstance(self.alpha, str):
                raise GraphpassError(f"alpha must be a number in [0, 1] or 'auto', got '{self.alpha}'")
            check_alpha(self.alpha)
        for key, a in self.site_alpha:
            check_alpha(a, f"alpha for site '{key}'")
        if self.decode_route and (self.scheme not in ("token", "w8", "w4") or not self.decode_fusions):
            raise GraphpassError("--decode-route needs --decode-fusions and --scheme token, w8 or w4")
        if self.keep_8bit and (self.scheme != "w4" or self.keep_8bit < 0):
            raise GraphpassError(f"--w4-keep-8bit takes a count >= 0 with --scheme w4, got {self.keep_8bit} "
                                 f"with --scheme {self.scheme}")
        if self.decode_route and self.kv_cache:   # the cache rewrite reads attention outside an If body
            raise GraphpassError("--decode-route and --kv-cache are not combined yet: choose one")
        if self.kv_cache and not self.kv_fold and self.decode_fusions:
            raise GraphpassError(NO_FOLD_GQA + " (--decode-fusions makes it)")


@dataclass
class PipelineResult:
    output: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    smooth: SmoothReport | None = None
    quant: QuantReport | None = None
    alphas: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)   # scheme outlier, searched per site
    size_before: int = 0
    size_after: int = 0

    def format(self) -> str:
        lines = [f"  {name:<12} {sec:7.1f} s  {what}" for name, sec, what in self.steps]
        if self.quant is not None:
            lines.append(self.quant.format())
        lines.append(f"size {self.size_before / 1e6:.1f} MB -> {self.size_after / 1e6:.1f} MB "
                     f"({self.size_after / self.size_before:.3f}x)   wrote {self.output}")
        return "\n".join(lines)


def quantize(model: str | os.PathLike, output: str | os.PathLike, data=None,
             config: PipelineConfig = PipelineConfig(), progress: bool = True, log=print,
             stats=None) -> PipelineResult:
    """The whole job. `data`: dict of arrays (first axis = samples), a CalibrationDataReader, or
    an .npz path.

    `stats`: calibration stats computed earlier for this model (graphpass.budget re-quantizes
    with them); calibration is then skipped, and `data` is read only by --kv-cache (the written
    graph's cache is calibrated on it).
    """
    from graphpass.graph.runtime import fixed_mmap_threshold

    fixed_mmap_threshold()   # freed weights and activations go back to the OS, not to a heap hole
    data = as_data(data)
    with externalized(model) as src:     # inline weights: read once, then one at a time
        res = _quantize(src, output, data, config, progress, log, stats, Path(model))
    res.size_before = model_size(model)
    return res


def needs_calibration(config: PipelineConfig) -> bool:
    """Activation statistics are read: smoothing, static ranges, or the outlier columns."""
    return config.alpha is not None or config.scheme in ("static", "outlier")


def _quantize(src: Path, output, data, config: PipelineConfig, progress: bool, log, stats,
              original: Path) -> PipelineResult:
    from graphpass.calibrate.collect import calibrate

    res = PipelineResult(Path(output))
    awq = _awq_on(config, data, stats)   # w8 / w4: AWQ when data is given (else round to nearest)
    gptq = _gptq_on(config)
    needs_stats = (needs_calibration(config) or awq or gptq or config.keep_8bit) and stats is None
    packed = None

    def step(name: str, t0: float, what: str) -> None:
        res.steps.append((name, time.perf_counter() - t0, what))
        log(f"{name}: {what} ({res.steps[-1][1]:.1f} s)")

    t0 = time.perf_counter()
    proto = load_model(src, load_weights=False)
    if config.kv_cache:          # before any work: no output is written when the cache cannot be
        _kv_ready(proto, original, data, config)
    g = import_graph(proto, str(src.parent.resolve()))   # weights stay lazy
    del proto
    an = analyze(g)
    if not an.linears:
        log(f"nothing to quantize in {src}: no linear layer with a constant float weight; "
            "writing the graph unchanged")
        save_graph(g, output, check=True)
        res.quant, res.size_before, res.size_after = QuantReport(), model_size(src), model_size(output)
        return res
    _check_patterns(an, config)
    step("load", t0, f"{len(g.nodes)} nodes")
    if needs_stats:
        if data is None:
            raise GraphpassError(f"scheme '{config.scheme}'" + (" with smoothing" if config.alpha is not None else "")
                                 + " needs calibration data (--data)")
        t0 = time.perf_counter()
        row_step = config.row_step if config.alpha == "auto" or awq or config.keep_8bit else 0
        kv_abs = {} if config.kv_cache and config.kv_smooth is not None else None   # same runs: one read
        stats = calibrate(src, data, config.batch_size, config.threads, progress, row_step=row_step,
                          decode_steps=config.decode_steps, cache=kv_abs, gram_step=GRAM_STEP if gptq else 0,
                          rewrite=_calibration_fusions(config))
        step("calibrate", t0, f"{len(stats.min)} tensors over {stats.samples} samples"
             + (f" (and the {len(kv_abs)} KV caches)" if kv_abs else ""))
    if config.keep_8bit:
        config = _keep_8bit(an, stats, config, step)
    kv_known = None              # the written graph's cache statistic, when no run is needed for it
    if config.kv_cache and config.kv_smooth is not None:   # on the float q / k weights
        kv_known = _kv_smooth(g, original, data, config, step, progress, stats.kv_absmax if stats is not None else None)
    if awq:
        awq_rep = _awq(an, stats, config, step, progress, apply_clip=not gptq)
    elif config.alpha is not None:
        _smooth(an, stats, config, res, step, progress)
    if gptq:
        packed = _gptq(an, stats, config, awq_rep if awq else None, step, progress)
    if config.simplify_attention:
        t0 = time.perf_counter()
        _, n, why = drop_softmax_nan_guards(g)
        _, k = split_causal_attention(g, config.attention_chunks, an.consts._names)
        step("attention", t0, f"{n} softmax NaN guards dropped" + (f"; kept others: {why}" if why else "")
             + (f"; {k} causal attention blocks in {config.attention_chunks} query chunks" if k else ""))
    t0 = time.perf_counter()
    ranges = _ranges(stats, res.smooth) if stats is not None else None
    if config.scheme == "none":
        res.quant = QuantReport()
    else:
        qcfg = QuantConfig(config.scheme, config.lm_head, config.embedding_int8, config.skip)
        if config.scheme == "outlier":
            res.thresholds = res.thresholds or dict(config.outlier_thresholds)   # searched now, or earlier
            cols = calibrated_columns(an, stats, res.smooth, config.outlier, res.thresholds)
            _, res.quant = split_outliers(g, qcfg, cols, two_digit=two_digit_layers(an, config.outlier))
        else:
            _, res.quant = nbits_or(quantize_pass)(g, qcfg, ranges, None, None, nbits=config.nbits, packed=packed)
        if not res.quant.quantized and not res.quant.tables:
            log(f"nothing to quantize in {src}: no linear layer with a constant float weight")
        form = _weight_form(config)
        step("quantize", t0, f"{len(res.quant.quantized)} linear layers in {form} ({config.scheme})")
    if config.decode_fusions:
        t0 = time.perf_counter()
        step("decode", t0, fuse_decode_graph(g).format())
    if config.decode_route:
        t0 = time.perf_counter()
        step("route", t0, route_decode(g).format())
    t0 = time.perf_counter()
    save_graph(g, output, check=True)
    step("save", t0, "onnx.checker passed" + copy_sidecars(original, output))
    if config.kv_cache:
        _kv_cache(Path(output), data, config, step, progress, kv_known)
    res.size_before, res.size_after = model_size(src), model_size(output)
    return res


def _calibration_fusions(config: PipelineConfig):
    """With --decode-fusions, calibration runs the graph after the attention and norm fusions:
    the same linear inputs, computed by the written graph's own kernels (exact up to float
    rounding), and far fewer nodes (with-past SmolLM2: 7,426 -> 598; calibration ~14% less CPU).
    Not with a batch over one window: GroupQueryAttention refuses batch > 1 with a past."""
    if not config.decode_fusions or config.batch_size != 1:
        return None
    return lambda g: fuse_decode_graph(g, rescales=False)


def _kv_smooth(g, original: Path, data, config: PipelineConfig, step, progress: bool,
               absmax: dict | None = None) -> dict | None:
    """Key-channel smoothing: σ from the float cache of `original` (its statistic `absmax`, when
    the activation calibration gathered it) folded into g's q / k weights before they are
    quantized (passes/kv_smooth.py). Returns the written graph's cache statistic when it follows
    without a run: weights otherwise untouched (--scheme none, no smoothing), the keys are K / σ
    (σ equal on RoPE pairs, so their pair norm is A / σ) and the values unchanged; else None."""
    from graphpass.passes.kv_smooth import key_factors, smooth_keys

    t0 = time.perf_counter()
    if absmax is None:
        absmax = cache_absmax(original, _kv_data(data), config.decode_steps, config.batch_size,
                              config.threads, progress)
    sig = key_factors(absmax, config.kv_smooth)
    n, why = smooth_keys(g, sig)
    if n < len(sig):
        raise GraphpassError(f"--kv-smooth: {why[0] if why else 'a layer was not smoothed'}")
    step("kv smooth", t0, f"{n} layers: key channels moved into the query (alpha {config.kv_smooth})")
    if config.scheme != "none" or config.alpha is not None:
        return None
    return {k: a / sig[k] if k in sig else a for k, a in absmax.items()}


def _kv_cache(output: Path, data, config: PipelineConfig, step, progress: bool, absmax: dict | None = None) -> None:
    """The written graph's cache calibrated as it runs (after smoothing moved value channels and
    weights were rounded; `absmax`: its statistic known without a run), then rewritten to int8
    in place."""
    t0 = time.perf_counter()
    how = "from the key smoothing's pass (float weights)" if absmax is not None else (
        f"over prefill windows + {config.decode_steps} decode steps each" if config.decode_steps else
        "over prefill windows only (--decode-steps 0)")
    if absmax is None:
        absmax = cache_absmax(output, _kv_data(data), config.decode_steps, config.batch_size,
                              config.threads, progress)
    g = import_graph(load_model(output, load_weights=False), str(output.parent.resolve()))
    what = quantize_kv_cache(g, cache_scales(absmax, config.kv_scales), config.kv_fold).format()
    save_graph(g, output, check=True)
    step("kv cache", t0, f"{what}; scales {how}")


def _kv_ready(proto, original: Path, data, config: PipelineConfig) -> None:
    """--kv-cache on this model and data: a with-past graph, and data that feeds its past inputs;
    --kv-no-fold only where attention is decomposed."""
    from graphpass.calibrate.data import check_data
    from graphpass.graph.decode import past_layout

    if past_layout(proto, original.parent) is None:
        raise GraphpassError(f"{original.name}: takes no past_key_values.* input (an int8 KV cache "
                             "needs a with-past graph)")
    if not config.kv_fold and any(n.op_type == "GroupQueryAttention" for n in proto.graph.node):
        raise GraphpassError(f"{NO_FOLD_GQA} ({original.name} has it)")
    if isinstance(_kv_data(data), dict):
        check_data(data, proto, "data")


def _kv_data(data):
    if data is None:
        raise GraphpassError("--kv-cache needs calibration data (--data) for its scales")
    return data


def _smooth(an, stats, config: PipelineConfig, res: PipelineResult, step, progress) -> None:
    """Fold the scales into the analysed gs.Graph (new weights stay numpy arrays in it)."""
    t0 = time.perf_counter()
    stats.require({s.act: s.consumers[0].shape(an.consts)[0] for s in an.sites}, "calibration")
    overrides = dict(config.site_alpha)
    known = {k for st in an.sites for k in (st.name, st.anchor, st.act)}
    for key in overrides:
        if key not in known:
            raise GraphpassError(f"no smoothing site named '{key}' (see graphpass inspect)")
    alpha = 0.5 if config.alpha == "auto" else float(config.alpha)
    if config.alpha == "auto":
        from graphpass.search.alpha import search_alpha
        from graphpass.search.nbits_alpha import alpha_search_for   # w8 / w4: the kernel's arithmetic

        chosen, _ = alpha_search_for(config, search_alpha)(an, stats, config.scheme, progress=progress)
        if config.scheme == "outlier":   # (α, threshold) per site: search/outlier_alpha.py
            res.thresholds = {k: t for k, (_, t) in chosen.items() if not _overridden(an.site(k), config.site_alpha)}
            chosen = {k: a for k, (a, _) in chosen.items()}
        overrides = {**dict(config.site_alpha), **{k: v for k, v in chosen.items()
                                                     if not _overridden(an.site(k), config.site_alpha)}}
        step("alpha", t0, f"searched {len(chosen)} sites, mean alpha "
                          f"{sum(chosen.values()) / max(len(chosen), 1):.2f}")
        t0 = time.perf_counter()
    res.alphas = overrides
    cfg = SmoothConfig(alpha=alpha, site_alpha=tuple(overrides.items()))
    _, res.smooth = smooth_pass(an.graph, {s.act: stats.absmax(s.act) for s in an.sites}, cfg, an)
    step("smooth", t0, f"{len(res.smooth.rows)} sites folded, {len(res.smooth.uncovered)} layers not covered")


def _overridden(site, site_alpha) -> bool:
    """The user named this site (by name, anchor or tensor): their alpha wins over the search."""
    return any(key in (site.name, site.anchor, site.act) for key, _ in site_alpha)


def _ranges(stats, rep: SmoothReport | None) -> dict[str, tuple[float, float]]:
    out = {t: (float(stats.min[t].min()), float(stats.max[t].max())) for t in stats.min}
    for new, (old, s) in (rep.scales.items() if rep else ()):
        out[new] = (float((stats.min[old] / s).min()), float((stats.max[old] / s).max()))
    return out


def _awq_on(config: PipelineConfig, data, stats) -> bool:
    from graphpass.passes.nbits import NBITS_SCHEMES

    return config.awq and config.scheme in NBITS_SCHEMES and (data is not None or stats is not None and stats.rows)


def _awq(an, stats, config: PipelineConfig, step, progress, apply_clip: bool = True):
    """AWQ scales (with SmoothQuant's α in their grid unless --no-smooth) folded, readers clipped."""
    from graphpass.passes.awq import awq

    t0 = time.perf_counter()
    stats.require({s.act: s.consumers[0].shape(an.consts)[0] for s in an.sites}, "calibration")
    rep = awq(an, stats, _nbits_config(config), config.alpha, config.awq_clip, progress, apply_clip)
    step("awq", t0, rep.summary())
    return rep


def _gptq_on(config: PipelineConfig) -> bool:
    from graphpass.passes.nbits import NBITS_SCHEMES

    return bool(config.gptq) and config.scheme in NBITS_SCHEMES   # opt-in: ~2x the CPU time of AWQ + clip


def _check_patterns(an, config: PipelineConfig) -> None:
    """Every --skip / --layer-block-size pattern names at least one linear layer (a typo is not
    silently ignored)."""
    import fnmatch

    blocks = tuple(p for p, _ in config.nbits.layer_blocks) if config.nbits else ()
    for flag, patterns in (("--skip", config.skip), ("--layer-block-size", blocks)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(lin.name, p) for lin in an.linears):
                raise GraphpassError(f"{flag} {p!r} matches no linear layer (names look like "
                                     f"{an.linears[0].name!r}; see graphpass inspect)")


def _weight_form(config: PipelineConfig) -> str:
    """How the quantized linear layers' weights are stored, for the log: 'int8' or 'N bits', and
    the layers in other bits ('--w4-keep-8bit', '--head-bits')."""
    from graphpass.passes.nbits import NBITS_SCHEMES

    if config.scheme not in NBITS_SCHEMES:
        return "int8"
    c = _nbits_config(config)
    other = ([f"{len(c.keep8)} of them in 8 bits"] if c.keep8 and c.bits != 8 else []) + \
        ([f"the LM head in {c.head_bits} bits"] if c.head_bits and c.head_bits != c.bits else [])
    return ", ".join([f"{c.bits} bits"] + other)


def _nbits_config(config: PipelineConfig) -> NBitsConfig:
    """The MatMulNBits settings of a w8 / w4 job: as given, else the scheme's defaults."""
    from graphpass.passes.nbits import default_config

    return config.nbits if config.nbits is not None else default_config(config.scheme)


def _keep_8bit(an, stats, config: PipelineConfig, step) -> PipelineConfig:
    """The config whose nbits keeps the --w4-keep-8bit layers of largest 4-bit error in 8 bits."""
    from dataclasses import replace

    from graphpass.search.mixed import keep_8bit

    t0 = time.perf_counter()
    cfg, ranked = keep_8bit(an, stats, _nbits_config(config), config.keep_8bit)
    extra = sum(b for _, _, b in ranked[:config.keep_8bit])
    step("keep 8-bit", t0, f"{len(cfg.keep8)} of {len(ranked)} layers in 8 bits (+{extra / 1e6:.1f} MB), "
                           f"4-bit error {ranked[0][1]:.4f} .. {ranked[-1][1]:.4f}" if ranked else "no layer")
    return replace(config, nbits=cfg)


def _gptq(an, stats, config: PipelineConfig, awq_rep, step, progress) -> dict:
    """GPTQ codes per layer (passes/gptq.py), after the AWQ fold and with its clip ratios."""
    from graphpass.passes.gptq import gptq

    t0 = time.perf_counter()
    if not stats.gram:
        raise GraphpassError("--gptq needs X^T·X from calibration: pass --data (cached stats have none)")
    cfg = _nbits_config(config)
    scales = {k: ch.scales for k, ch in awq_rep.choices.items()} if awq_rep else {}
    ratios = {r["linear"]: r["ratio"] for r in awq_rep.clip} if awq_rep else {}
    try:
        rep = gptq(an, stats, cfg, scales, ratios, progress, config.gptq_how)
    finally:     # the spilled rows (1.6 GB of temporary disk on SmolLM2) are not read again
        stats.gram.close()
        stats.gram = None
    step("gptq", t0, rep.summary())
    return rep.packed
