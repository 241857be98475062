"""Smoothing as a checked step: stats validated against the sites, fold, then prove the graph is unchanged.

smooth_model(model, stats, config) -> (model, report), raising GraphpassError when the stats do not
fit the model or when the folded graph's outputs move by more than VERIFY_RTOL on probe inputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphpass.validate.bench import synthetic_inputs
from graphpass.errors import GraphpassError
from graphpass.graph.gs_io import constants, nbytes, to_model
from graphpass.graph.io import input_specs
from graphpass.passes.smooth import SmoothConfig, SmoothReport, smooth
from graphpass.match.sites import analyze
from graphpass.graph.runtime import make_session

VERIFY_RTOL = 1e-3   # max |Δ| / max |y| allowed after an exact fold (float32 reassociation only)


def check_alpha(alpha: float, what: str = "alpha") -> None:
    if not (0.0 <= alpha <= 1.0) or alpha != alpha:
        raise GraphpassError(f"{what} must be within [0, 1], got {alpha}")


def smooth_model(model: onnx.ModelProto | gs.Graph, stats, config: SmoothConfig, verify: bool = True,
                 base_dir: str | None = None) -> tuple[onnx.ModelProto | gs.Graph, SmoothReport]:
    """`base_dir`: the model's folder when its weights were left in external data (read one at a
    time). A gs.Graph is smoothed in place (ready for io.save_graph); a ModelProto is written back."""
    check_alpha(config.alpha)
    for key, a in config.site_alpha:
        check_alpha(a, f"alpha for site '{key}'")
    an = analyze(model, base_dir)
    acts = {s.act: s.consumers[0].shape(an.consts)[0] for s in an.sites}
    if config.allow_mul:
        acts.update({act: r[0].shape(an.consts)[0] for act, r in an.unfoldable})
    known = {s.name for s in an.sites} | {s.anchor for s in an.sites} | {s.act for s in an.sites}
    for key, _ in config.site_alpha:
        if key not in known:
            raise GraphpassError(f"no smoothing site named '{key}' (see graphpass inspect)")
    if not acts:
        return model, SmoothReport(uncovered=list(an.uncovered))
    stats.require(acts, "stats")
    verify = verify and _weight_bytes(an.graph) < (1 << 31) - (1 << 24)   # both graphs must serialize
    original = to_model(an.graph) if verify else None    # weights still lazy: small
    model, rep = smooth(model, {t: stats.absmax(t) for t in acts}, config, an)
    if verify:
        err = output_change(original, to_model(an.graph), base_dir)
        if err > VERIFY_RTOL:
            raise GraphpassError(f"smoothing changed the graph's outputs (max relative error {err:.2e}); "
                                 "a site was folded wrongly: please report this model")
        rep.verified_error = err
    return model, rep


def _weight_bytes(g: gs.Graph) -> int:
    """Bytes of the constants, inline or external, from their shapes (ByteSize fails past 2 GB)."""
    return sum(nbytes(c) for c in constants(g))


def output_change(a: onnx.ModelProto, b: onnx.ModelProto, base_dir: str | None = None,
                  shape=(2, 16)) -> float:
    """max |out_a - out_b| / max |out_a| over all outputs, on probe inputs of `shape`.

    A with-past graph is compared on what its caller sees: logits of a prefill from an empty
    cache, then of decode steps where each graph reads back its OWN present as past (a folded
    value projection changes what the cache holds, not what the loop computes)."""
    from graphpass.graph.decode import past_layout

    layout = past_layout(a, base_dir)   # genai_config.json there may size the cache
    if layout is not None:
        return _decode_change(a, b, layout, base_dir, shape)
    try:
        feeds = synthetic_inputs(input_specs(a), shape)
    except GraphpassError:
        return 0.0  # inputs we cannot synthesize: the caller's own tests must cover this graph
    ra = make_session(a, external_dir=base_dir).run(None, feeds)
    rb = make_session(b, external_dir=base_dir).run(None, feeds)
    return _worst_relative(zip(ra, rb))


def _decode_change(a, b, layout, base_dir, shape, steps: int = 2) -> float:
    from graphpass.graph.decode import DecodeRunner

    limit = min([s.limit for s in input_specs(a) if s.limit] or [100])
    ids = np.random.default_rng(0).integers(0, limit, size=(shape[0], shape[1] + steps))
    runs = [DecodeRunner(make_session(m, external_dir=base_dir), layout) for m in (a, b)]
    outs = [[r.prefill(ids[:, :shape[1]])] for r in runs]
    for k in range(steps):
        for r, o in zip(runs, outs):
            o.append(r.step(ids[:, shape[1] + k:shape[1] + k + 1]))
    return _worst_relative(zip(*outs))


def _worst_relative(pairs) -> float:
    """max over (x, y) pairs of max |x - y| / max |x|."""
    worst = 0.0
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst
