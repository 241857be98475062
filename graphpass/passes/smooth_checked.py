"""Smoothing as a checked step: stats validated against the sites, fold, then prove the graph is unchanged.

smooth_model(model, stats, config) -> (model, report), raising GraphpassError when the stats do not
fit the model or when the folded graph's outputs move by more than VERIFY_RTOL on probe inputs.
"""
from __future__ import annotations

import numpy as np
import onnx

from graphpass.validate.bench import synthetic_inputs
from graphpass.errors import GraphpassError
from graphpass.graph.decode import empty_cache, past_layout
from graphpass.graph.io import input_specs
from graphpass.passes.smooth import SmoothConfig, SmoothReport, smooth
from graphpass.match.sites import analyze
from graphpass.graph.runtime import make_session

VERIFY_RTOL = 1e-3   # max |Δ| / max |y| allowed after an exact fold (float32 reassociation only)


def check_alpha(alpha: float, what: str = "alpha") -> None:
    if not (0.0 <= alpha <= 1.0) or alpha != alpha:
        raise GraphpassError(f"{what} must be within [0, 1], got {alpha}")


def smooth_model(model: onnx.ModelProto, stats, config: SmoothConfig, verify: bool = True,
                 base_dir: str | None = None) -> tuple[onnx.ModelProto, SmoothReport]:
    """`base_dir`: the model's folder when its weights were left in external data (read one at a
    time; the result holds every weight inline, ready for save_model(release=True))."""
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
    original = onnx.ModelProto()
    if verify and _weight_bytes(model) < (1 << 31) - (1 << 24):   # both graphs must serialize
        original.CopyFrom(model)
    else:
        verify = False
    model, rep = smooth(model, {t: stats.absmax(t) for t in acts}, config, an)
    if verify:
        err = output_change(original, model, base_dir)
        if err > VERIFY_RTOL:
            raise GraphpassError(f"smoothing changed the graph's outputs (max relative error {err:.2e}); "
                                 "a site was folded wrongly: please report this model")
        rep.verified_error = err
    return model, rep


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers, inline or external, from their dims (ByteSize fails past 2 GB)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) *
               np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in model.graph.initializer)


def output_change(a: onnx.ModelProto, b: onnx.ModelProto, base_dir: str | None = None,
                  shape=(2, 16)) -> float:
    """max |out_a - out_b| / max |out_a| over all outputs, on probe inputs of `shape`."""
    try:
        layout = past_layout(a, base_dir)   # a with-past graph is probed as a prefill, empty past
        past = empty_cache(layout, shape[0]).past if layout is not None else {}
        feeds = {**synthetic_inputs([s for s in input_specs(a) if s.name not in past], shape), **past}
    except GraphpassError:
        return 0.0  # inputs we cannot synthesize: the caller's own tests must cover this graph
    ra = make_session(a, external_dir=base_dir).run(None, feeds)
    rb = make_session(b, external_dir=base_dir).run(None, feeds)
    worst = 0.0
    for x, y in zip(ra, rb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst
