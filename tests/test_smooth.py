"""SmoothQuant folding (graphpass.passes.smooth, graphpass.passes.smooth_checked): exact on every synthetic
architecture, no runtime op added, outliers flattened, and the edge cases around it."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import (EXACT_RTOL, VARIANTS, cli_error, cli_ok, copy_model, inits, make_model,
                      max_rel_err, node, norm_nodes, op_counts, run, write_folder)
from graphpass.errors import GraphpassError
from graphpass.passes.smooth import S_MAX, S_MIN, SmoothConfig, site_scales, smooth, smoothing_scales
from graphpass.match.sites import NormFold, analyze
from graphpass.passes.smooth_checked import smooth_model
from graphpass.calibrate.stats import Stats
from graphpass.testing.synthetic import SyntheticConfig, build_prenorm_decoder

OUTLIER_RATIO = 10.0  # a site whose per-channel max|x| has max/median >= this is an outlier site
FLATTENING = 5.0  # at alpha 0.5 smoothing divides that max/median by at least this much


def _absmax(stats: Stats) -> dict[str, np.ndarray]:
    return {t: stats.absmax(t) for t in stats.min}


def _check(m: onnx.ModelProto, variant: str) -> None:
    if variant == "llama-simplified":  # onnx has no schema for onnxruntime's op: nothing else wrong
        with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
            onnx.checker.check_model(m, full_check=True)
    else:
        onnx.checker.check_model(m, full_check=True)


def _cloned_ops(an) -> Counter:
    """Op types of the norm tails smoothing duplicates (a norm whose output also feeds a residual)."""
    return Counter(n.op for site in an.sites if isinstance(site.fold, NormFold) and site.fold.clone
                   for n in site.fold.nodes)


def _changed(a: onnx.ModelProto, b: onnx.ModelProto) -> int:
    wa, wb = inits(a), inits(b)
    return sum(k not in wb or not np.array_equal(v, wb[k]) for k, v in wa.items())


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_is_exact_and_adds_no_op(synth, calibrated, variant):
    s = synth(variant)
    rng = np.random.default_rng(list(VARIANTS).index(variant))
    an = analyze(s.fresh())
    overrides = tuple((site.name, float(rng.uniform())) for site in an.sites[::2])
    cfg = SmoothConfig(alpha=float(rng.uniform()), site_alpha=overrides)
    new, rep = smooth(s.fresh(), _absmax(calibrated(variant)), cfg)
    feeds = s.probe()
    assert max_rel_err(run(s.model, feeds), run(new, feeds)) <= EXACT_RTOL
    _check(new, variant)
    clones = _cloned_ops(an)
    assert op_counts(new) - op_counts(s.model) == clones and not op_counts(s.model) - op_counts(new)
    assert op_counts(new)["Mul"] == op_counts(s.model)["Mul"] + clones["Mul"]
    assert [r["site"] for r in rep.rows] == [site.name for site in an.sites]
    assert [r["alpha"] for r in rep.rows[::2]] == [a for _, a in overrides]
    assert rep.muls_added == 0 and _changed(s.model, new) >= len(an.sites)  # it did fold something


def test_postln_adds_only_the_cloned_layer_norms(synth, calibrated):
    s = synth("postln")
    new, rep = smooth(s.fresh(), _absmax(calibrated("postln")))
    assert dict(op_counts(new) - op_counts(s.model)) == {"LayerNormalization": 2 * SyntheticConfig().layers}
    assert all(r["cloned"] for r in rep.rows if r["kind"] == "layernorm")


@pytest.mark.parametrize("variant", ["prenorm", "llama", "postln", "postln-gemm"])
def test_allow_mul_adds_one_mul_per_unfoldable_group(synth, calibrated, variant):
    s = synth(variant)
    an = analyze(s.fresh())
    new, rep = smooth(s.fresh(), _absmax(calibrated(variant)), SmoothConfig(alpha=0.5, allow_mul=True))
    added = op_counts(new) - op_counts(s.model)
    assert rep.muls_added == len(an.unfoldable) == added["Mul"] - _cloned_ops(an)["Mul"]
    assert (len(an.unfoldable) > 0) == (variant != "llama")
    prod = {o: n for n in new.graph.node for o in n.output}
    for act, readers in an.unfoldable:
        for lin in readers:
            mul = prod[next(n for n in new.graph.node if n.name == lin.name).input[0]]
            assert mul.op_type == "Mul" and mul.input[0] == act
    feeds = s.probe()
    assert max_rel_err(run(s.model, feeds), run(new, feeds)) <= EXACT_RTOL
    onnx.checker.check_model(new, full_check=True)


@pytest.mark.parametrize("variant", ["prenorm", "llama", "postln"])
def test_outlier_ratio_drops_at_alpha_half(synth, calibrated, variant):
    _, rep = smooth(synth(variant).fresh(), _absmax(calibrated(variant)), SmoothConfig(alpha=0.5))
    outliers = [r for r in rep.rows if r["act_ratio_before"] >= OUTLIER_RATIO]
    assert len(outliers) >= len(rep.rows) // 2
    for r in outliers:
        assert r["act_ratio_before"] / r["act_ratio_after"] >= FLATTENING, r["site"]
        assert r["w_ratio_after"] >= r["w_ratio_before"] / FLATTENING  # the weight takes some of it


def test_smooth_model_verifies_and_reports(synth, calibrated):
    s = synth("llama")
    new, rep = smooth_model(s.fresh(), calibrated("llama"), SmoothConfig(alpha=0.8))
    assert rep.verified_error is not None and rep.verified_error <= EXACT_RTOL
    text = rep.format()
    assert "8 sites folded, 0 Mul nodes added, 1 linear layers not covered" in text
    assert "tied" in text and "outputs unchanged" in text


# ---------------------------------------------------------------------------- scales
def test_smoothing_scales_formula_and_guards():
    rng = np.random.default_rng(0)
    a, w = rng.uniform(0.1, 50, 16), rng.uniform(0.01, 2, 16)
    for alpha in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(smoothing_scales(a, w, alpha), a ** alpha / w ** (1 - alpha), rtol=1e-12)
    a[[1, 2, 3]] = [0.0, np.nan, np.inf]
    w[4] = 0.0
    s = smoothing_scales(a, w, 0.5)
    assert (s[[1, 2, 3, 4]] == 1.0).all() and np.isfinite(s).all()
    assert smoothing_scales(np.array([1e12]), np.array([1e-3]), 1.0)[0] == S_MAX
    assert smoothing_scales(np.array([1.0]), np.array([1e6]), 0.0)[0] == S_MIN


def test_gqa_scale_is_shared_by_the_heads_of_one_kv_head(synth, calibrated):
    an = analyze(synth("llama").fresh())
    stats = calibrated("llama")
    for site in (s for s in an.sites if s.kind == "attn"):
        sc = site_scales(site, an.consts, stats.absmax(site.act), 0.5)
        cmap = site.fold.channel_map
        for col in np.unique(cmap):
            assert np.unique(sc[cmap == col]).size == 1
        assert np.unique(sc).size > 1


def test_zero_channels_keep_scale_one(synth, calibrated):
    s = synth("prenorm")
    act = _absmax(calibrated("prenorm"))
    an = analyze(s.fresh())
    site = an.sites[0]  # ln_1 -> q, k, v
    zero = [0, 5, 3]  # 3 is an outlier channel
    act[site.act] = act[site.act].copy()
    act[site.act][zero] = 0.0
    new, _ = smooth(s.fresh(), act)
    before, after = inits(s.model), inits(new)
    gamma = site.fold.nodes[0].inputs[1].name
    np.testing.assert_array_equal(after[gamma][zero], before[gamma][zero])
    assert not np.array_equal(after[gamma], before[gamma])
    producers = {id(x.fold.producer.node) for x in an.sites if not isinstance(x.fold, NormFold)}
    kept = [lin for lin in site.consumers if id(lin.node) not in producers]  # q, k (v feeds o_proj)
    assert len(kept) == 2
    for lin in kept:
        w = lin.node.inputs[1].name
        np.testing.assert_array_equal(after[w][zero], before[w][zero])
        assert not np.array_equal(after[w], before[w])
    assert all(np.isfinite(v).all() for v in after.values() if v.dtype.kind == "f")
    feeds = s.probe()
    assert max_rel_err(run(s.model, feeds), run(new, feeds)) <= EXACT_RTOL


# ---------------------------------------------------------------------------- shared weights
def _two_norms_one_weight(other_reader_is_norm: bool):
    """x -> LN_a -> MatMul(W) -> ya ; (LN_b(x) | z) -> MatMul(W) -> yb, W one initializer."""
    rng = np.random.default_rng(3)
    C, w = 8, {"W": rng.standard_normal((8, 5)).astype(np.float32)}
    nodes = norm_nodes("ln", "x", "ha", C, rng, w, gamma_boost=[2])
    if other_reader_is_norm:
        nodes += norm_nodes("rms_div", "x", "hb", C, rng, w, gamma_boost=[6])
    nodes += [node("MatMul", ["ha", "W"], "ya"), node("MatMul", ["hb" if other_reader_is_norm else "z", "W"], "yb")]
    m = make_model(nodes, [("x", ["n", C]), ("z", ["n", C])], [("ya", ["n", 5]), ("yb", ["n", 5])], w)
    return m, {"x": rng.standard_normal((6, C)).astype(np.float32),
               "z": rng.standard_normal((6, C)).astype(np.float32)}


@pytest.mark.parametrize("other_reader_is_norm", [True, False])
def test_shared_weight(other_reader_is_norm):
    m, feeds = _two_norms_one_weight(other_reader_is_norm)
    ref = run(m, feeds, ["ha"] + (["hb"] if other_reader_is_norm else []))
    act = {t: np.abs(ref[t]).max(0) for t in ("ha", "hb") if t in ref}
    new, rep = smooth(copy_model(m), act, SmoothConfig(alpha=0.6))
    assert len(rep.rows) == len(act)
    got = run(new, feeds)
    assert max_rel_err({k: ref[k] for k in ("ya", "yb")}, got) <= EXACT_RTOL
    w_of = {n.output[0]: inits(new)[n.input[1]] for n in new.graph.node if n.op_type == "MatMul"}
    original = inits(m)["W"]
    assert not np.array_equal(w_of["ya"], original)
    if other_reader_is_norm:
        assert not np.array_equal(w_of["yb"], original)
    else:
        np.testing.assert_array_equal(w_of["yb"], original)  # the unsmoothed reader keeps W
    onnx.checker.check_model(new, full_check=True)


# ---------------------------------------------------------------------------- bad stats, bad alpha
def test_nan_in_stats_is_refused(synth, calibrated):
    s = synth("prenorm")
    bad = Stats({t: v.copy() for t, v in calibrated("prenorm").min.items()},
                {t: v.copy() for t, v in calibrated("prenorm").max.items()}, 4)
    victim = analyze(s.fresh()).sites[2].act
    bad.max[victim][7] = np.nan
    with pytest.raises(GraphpassError, match="NaN or Inf") as e:
        smooth_model(s.fresh(), bad, SmoothConfig())
    assert f"'{victim}'" in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(synth, calibrated, alpha):
    s = synth("prenorm")
    with pytest.raises(GraphpassError, match=r"alpha must be within \[0, 1\]"):
        smooth_model(s.fresh(), calibrated("prenorm"), SmoothConfig(alpha=alpha))
    site = analyze(s.model).sites[0].name
    with pytest.raises(GraphpassError, match=f"alpha for site '{site}' must be within"):
        smooth_model(s.fresh(), calibrated("prenorm"), SmoothConfig(site_alpha=((site, alpha),)))


def test_stats_of_another_model(synth, calibrated, tmp_path):
    s = synth("prenorm")
    with pytest.raises(GraphpassError, match="stats has no entry for tensor '/transformer/") as e:
        smooth_model(s.fresh(), calibrated("llama"), SmoothConfig())
    assert len(str(e.value).splitlines()) == 1
    narrow = build_prenorm_decoder(SyntheticConfig(hidden=32, ffn=64))
    with pytest.raises(GraphpassError, match=r"tensor '/transformer/.*' has 64 channels, the model has 32"):
        smooth_model(narrow, calibrated("prenorm"), SmoothConfig())


# ---------------------------------------------------------------------------- the smooth command
def test_smooth_cli_end_to_end(capsys, synth, calibrated, tmp_path):
    s = synth("prenorm")
    calibrated("prenorm").save(tmp_path / "s.npz")
    out = tmp_path / "smooth" / "model.onnx"
    out.parent.mkdir()
    stdout, _ = cli_ok(capsys, ["smooth", s.path, "--stats", tmp_path / "s.npz", "--alpha", "0.7",
                                "--site-alpha", "/transformer/ln_f/LayerNormalization=0.2",
                                "--report", tmp_path / "r.json", "-o", out])
    assert "7 sites folded" in stdout and f"wrote {out}" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["alpha"] for r in report["sites"]] == [0.7] * 6 + [0.2]
    assert report["muls_added"] == 0 and len(report["uncovered"]) == 2
    feeds = s.probe()
    assert max_rel_err(run(s.model, feeds), run(out, feeds)) <= EXACT_RTOL


@pytest.mark.parametrize("extra, needle", [
    (["--alpha", "1.5"], "alpha must be within [0, 1], got 1.5"),
    (["--site-alpha", "nope=0.5"], "no smoothing site named 'nope'"),
    (["--site-alpha", "0.5"], "--site-alpha takes SITE=ALPHA, got '0.5'"),
    (["--site-alpha", "/lm_head/MatMul=x"], "--site-alpha takes SITE=ALPHA"),
])
def test_smooth_cli_option_errors(capsys, synth, calibrated, tmp_path, extra, needle):
    s = synth("prenorm")
    calibrated("prenorm").save(tmp_path / "s.npz")
    out = tmp_path / "o.onnx"
    msg = cli_error(capsys, ["smooth", s.path, "--stats", tmp_path / "s.npz", *extra, "-o", out], [out])
    assert needle in msg


def test_smooth_cli_will_not_overwrite_its_input_by_accident(capsys, synth, calibrated, tmp_path):
    s = synth("prenorm")
    calibrated("prenorm").save(tmp_path / "s.npz")
    folder = tmp_path / "m"
    path = write_folder(folder, s.model, "causal-lm")
    before = path.read_bytes()
    msg = cli_error(capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "-o", path])
    assert "--overwrite" in msg and path.read_bytes() == before
    cli_ok(capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "--overwrite", "-o", path])
    assert path.read_bytes() != before
    missing = tmp_path / "no" / "o.onnx"
    assert "output folder does not exist" in cli_error(
        capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "-o", missing])


def test_smooth_cli_other_models_stats_is_one_line(capsys, synth, calibrated, tmp_path):
    calibrated("llama").save(tmp_path / "s.npz")
    out = tmp_path / "o.onnx"
    msg = cli_error(capsys, ["smooth", synth("prenorm").path, "--stats", tmp_path / "s.npz", "-o", out], [out])
    assert "stats has no entry for tensor '/transformer/h.0/ln_1/LayerNormalization_output_0'" in msg


def test_graph_without_a_site_is_written_unchanged(capsys, tmp_path):
    m = make_model([node("Relu", ["x"], "r"), node("Add", ["r", "x"], "y")], [("x", ["n", 4])],
                   [("y", ["n", 4])], {})
    path = write_folder(tmp_path / "m", m, "encoder")
    Stats().save(tmp_path / "s.npz")
    out = tmp_path / "o.onnx"
    stdout, err = cli_ok(capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "-o", out])
    assert err == f"warning: {path} has no smoothing site; writing the graph unchanged\n"
    assert onnx.load(str(out)).graph.SerializeToString() == m.graph.SerializeToString()


# ---------------------------------------------------------------------------- folds that leak
def _attention_with_value_output():
    """LN -> q, k, v; softmax(q k^T) v -> o_proj; v (the projection output) is also a graph output,
    as a kv-cache export writes present.value."""
    rng = np.random.default_rng(0)
    C, h = 8, 2
    w = {k: rng.standard_normal((C, C)).astype(np.float32) for k in ("wq", "wk", "wv", "wo")}
    w |= {"split": np.array([0, 0, h, C // h], np.int64), "merge": np.array([0, 0, C], np.int64)}
    nodes = norm_nodes("ln", "x", "n", C, rng, w) + [
        node("MatMul", ["n", "wq"], "q"), node("MatMul", ["n", "wk"], "k"), node("MatMul", ["n", "wv"], "v"),
        node("Reshape", ["q", "split"], "q4"), node("Transpose", ["q4"], "qh", perm=[0, 2, 1, 3]),
        node("Reshape", ["k", "split"], "k4"), node("Transpose", ["k4"], "kh", perm=[0, 2, 3, 1]),
        node("Reshape", ["v", "split"], "v4"), node("Transpose", ["v4"], "vh", perm=[0, 2, 1, 3]),
        node("MatMul", ["qh", "kh"], "s"), node("Softmax", ["s"], "p", axis=-1),
        node("MatMul", ["p", "vh"], "o"), node("Transpose", ["o"], "ot", perm=[0, 2, 1, 3]),
        node("Reshape", ["ot", "merge"], "a"), node("MatMul", ["a", "wo"], "y")]
    m = make_model(nodes, [("x", ["b", "s", C])], [("y", ["b", "s", C]), ("v", ["b", "s", C])], w)
    return m, {"x": rng.standard_normal((2, 5, C)).astype(np.float32)}


def _shared_transpose_producer():
    """y1 = x·E^T -> y1·W2 (a linear -> linear site) while z·E^T reads the same Transpose."""
    rng = np.random.default_rng(0)
    C = 8
    w = {"E": rng.standard_normal((C, C)).astype(np.float32), "W2": rng.standard_normal((C, C)).astype(np.float32)}
    nodes = [node("Transpose", ["E"], "T", perm=[1, 0]), node("MatMul", ["x", "T"], "y1"),
             node("MatMul", ["y1", "W2"], "out1"), node("MatMul", ["z", "T"], "out2")]
    m = make_model(nodes, [("x", ["n", C]), ("z", ["n", C])], [("out1", ["n", C]), ("out2", ["n", C])], w)
    return m, {k: rng.standard_normal((3, C)).astype(np.float32) for k in ("x", "z")}


def test_value_projection_read_elsewhere_is_not_folded():
    m, feeds = _attention_with_value_output()
    act = {t: np.abs(v).reshape(-1, v.shape[-1]).max(0) + 1.0 for t, v in run(m, feeds, ["n", "a"]).items()}
    new, _ = smooth(copy_model(m), act, SmoothConfig(alpha=0.5))
    assert max_rel_err(run(m, feeds), run(new, feeds)) <= EXACT_RTOL


def test_producer_with_shared_transposed_weight_is_not_folded():
    m, feeds = _shared_transpose_producer()
    new, _ = smooth(copy_model(m), {"y1": np.linspace(1.0, 40.0, 8)}, SmoothConfig(alpha=0.5))
    assert max_rel_err(run(m, feeds), run(new, feeds)) <= EXACT_RTOL
