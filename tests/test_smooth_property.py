"""Property: on any norm -> {MatMul, Gemm} block, calibrate + smooth leaves every output unchanged.

Random width, norm form (LayerNormalization with/without β, decomposed LN, decomposed RMSNorm
with Div or Reciprocal), 1-3 MatMul readers (optional bias Add), an optional Gemm(transB=1)
reader, an optional weight shared by two readers, an optional residual Add that also reads the
norm output, random α, calibration data with injected outlier channels."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import EXACT_RTOL, copy_model, make_model, max_rel_err, node, norm_nodes, op_counts, run
from graphpass.calibrate.collect import calibrate
from graphpass.graph.io import save_model
from graphpass.passes.smooth import SmoothConfig, smooth
from graphpass.match.sites import analyze

NORMS = {"ln": "layernorm", "ln_nobias": "layernorm", "ln_decomposed": "layernorm",
         "rms_div": "rmsnorm", "rms_reciprocal": "rmsnorm"}
CALIB_ROWS, PROBE_ROWS = 6, 5  # first axis (rank 2) or batch (rank 3, seq 3): shapes differ


@st.composite
def blocks(draw):
    c = draw(st.integers(4, 24))
    return dict(
        c=c,
        norm=draw(st.sampled_from(sorted(NORMS))),
        matmuls=draw(st.sampled_from([1, 2, 3])),
        biases=draw(st.lists(st.booleans(), min_size=3, max_size=3)),
        gemm=draw(st.booleans()),
        shared=draw(st.booleans()),
        residual=draw(st.booleans()),
        rank3=draw(st.booleans()),
        alpha=draw(st.sampled_from([0.0, 1.0]) | st.integers(1, 99).map(lambda k: k / 100)),
        outliers=draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=2, unique=True)),
        scale=draw(st.integers(5, 100).map(float)),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def build(p: dict) -> tuple[onnx.ModelProto, list[str]]:
    """The graph of one drawn block, and the names of its linear-layer nodes."""
    rng, c = np.random.default_rng(p["seed"]), p["c"]
    w: dict = {}
    nodes = norm_nodes(p["norm"], "x", "h", c, rng, w, gamma_boost=p["outliers"])
    rank3 = p["rank3"] and not p["gemm"]  # Gemm reads 2-D only
    shape = ["b", "s", c] if rank3 else ["n", c]
    outs, linears = [], []
    for k in range(p["matmuls"]):
        wname = "W0" if p["shared"] and k == 1 else f"W{k}"
        if wname not in w:
            w[wname] = rng.standard_normal((c, int(rng.integers(2, 12)))).astype(np.float32)
        y = f"y{k}"
        nodes.append(node("MatMul", ["h", wname], y))
        linears.append(nodes[-1].name)
        if p["biases"][k]:
            w[f"b{k}"] = rng.standard_normal(w[wname].shape[1]).astype(np.float32)
            nodes.append(node("Add", [y, f"b{k}"], f"{y}_b"))
            y = f"{y}_b"
        outs.append((y, shape[:-1] + [w[wname].shape[1]]))
    if p["gemm"]:
        w["Wg"], w["bg"] = (rng.standard_normal((7, c)).astype(np.float32),
                            rng.standard_normal(7).astype(np.float32))
        nodes.append(node("Gemm", ["h", "Wg", "bg"], "yg", transB=1))
        linears.append(nodes[-1].name)
        outs.append(("yg", ["n", 7]))
    if p["residual"]:
        nodes.append(node("Add", ["h", "x"], "res"))
        outs.append(("res", shape))
    return make_model(nodes, [("x", shape)], outs, w), linears


def inputs(p: dict, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, 3, p["c"]) if p["rank3"] and not p["gemm"] else (rows, p["c"])
    x = rng.standard_normal(shape)
    x[..., p["outliers"]] *= p["scale"]
    return {"x": x.astype(np.float32)}


def _ex(norm, matmuls, gemm, shared, residual, rank3, alpha, c=12):
    return dict(c=c, norm=norm, matmuls=matmuls, biases=[True, False, True], gemm=gemm, shared=shared,
                residual=residual, rank3=rank3, alpha=alpha, outliers=[1, c - 2], scale=60.0, seed=c)


# Hypothesis favours simple draws (one reader, alpha 0); these pin every norm form with the options on.
@example(_ex("ln", 3, True, True, True, False, 0.5))
@example(_ex("ln_nobias", 2, False, True, True, True, 0.9, c=5))
@example(_ex("ln_decomposed", 2, True, False, True, False, 0.3, c=24))
@example(_ex("rms_div", 3, False, True, True, True, 0.7))
@example(_ex("rms_reciprocal", 1, True, False, True, False, 1.0, c=4))
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_calibrate_then_smooth_is_exact(p):
    m, linears = build(p)
    onnx.checker.check_model(m, full_check=True)
    an = analyze(m)
    (site,) = an.sites
    assert site.kind == NORMS[p["norm"]] and an.uncovered == []
    assert [lin.name for lin in site.consumers] == linears
    assert site.fold.clone == p["residual"]
    with tempfile.TemporaryDirectory() as d:
        save_model(m, Path(d) / "m.onnx")
        stats = calibrate(Path(d) / "m.onnx", inputs(p, CALIB_ROWS, p["seed"]), batch_size=4, progress=False)
    new, rep = smooth(copy_model(m), {t: stats.absmax(t) for t in stats.min}, SmoothConfig(alpha=p["alpha"]))
    assert len(rep.rows) == 1
    onnx.checker.check_model(new, full_check=True)
    feeds = inputs(p, PROBE_ROWS, p["seed"] + 1)
    assert max_rel_err(run(m, feeds), run(new, feeds)) <= EXACT_RTOL
    tail = Counter(n.op for n in site.fold.nodes) if p["residual"] else Counter()
    assert op_counts(new) - op_counts(m) == tail and not op_counts(m) - op_counts(new)
