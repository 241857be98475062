"""--kv-cache int8: the cache round trip against numpy, 300 decode steps within written bounds of
the float-cache graph, both attention forms (decomposed Concat with folded scales, and
GroupQueryAttention's own int8 cache) agreeing, and one-line errors for a float cache."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import cli_error, cli_ok

from graphpass.calibrate.data import build_data
from graphpass.calibrate.kv import cache_absmax, cache_scales
from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, conform_empty_past, past_layout
from graphpass.graph.runtime import make_session
from graphpass.passes.kv_cache import quantize_kv_cache
from graphpass.testing.past import PAST_BUILDS, build_optimum_past, token_ids
from graphpass.testing.synthetic import SyntheticConfig

CFG = SyntheticConfig()
BUILDS = PAST_BUILDS
CALIB_LEN = 64            # calibration windows; decoding runs far past them (RoPE bound)
STEPS = 300
# Bounds of the int8 cache against the float cache over STEPS decode steps (tiny random decoder
# with 40x outlier channels): the largest logit error within 12% of the largest logit, the mean
# within 6% of the mean |logit|, the greedy token equal at >= 88% of positions. Per-(head,
# channel) scales give 7.8% / 3.5% / 94% here; one scale per head 19% / 12% / 80% (fails all three).
MAX_REL, MEAN_REL, TOP1 = 0.12, 0.06, 0.88



@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """form -> (float model path, int8-cache model path, scales, int8 model without folding)."""
    out = {}
    for form, build in BUILDS.items():
        d = tmp_path_factory.mktemp(f"kv_{form}")
        m = build(CFG)
        onnx.save(m, d / "float.onnx")
        data = build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, m)
        scales = cache_scales(cache_absmax(d / "float.onnx", data, 4, progress=False))
        for name, fold in (("int8.onnx", True), ("int8_nofold.onnx", False)):
            g = gs.import_onnx(m)
            quantize_kv_cache(g, scales, fold)
            onnx.save(gs.export_onnx(g), d / name)
        out[form] = (d / "float.onnx", d / "int8.onnx", scales, d / "int8_nofold.onnx")
    return out


def _runner(path) -> DecodeRunner:
    return DecodeRunner(make_session(path, 1), past_layout(onnx.load(str(path))))


def _decode(path, ids: np.ndarray, prefill: int = 8) -> tuple[np.ndarray, DecodeRunner]:
    r = _runner(path)
    out = [r.prefill(ids[None, :prefill])]
    out += [r.step(ids[None, t:t + 1]) for t in range(prefill, len(ids))]
    return np.concatenate(out, 1)[0], r


@pytest.mark.parametrize("form", BUILDS)
def test_cache_round_trip_against_numpy(pair, form):
    """Layer 0's cache (its K and V do not depend on any cache read): present8 =
    clip(round(present_f / s), -127, 127) over the prefill and every decode step, and present8 · s
    within s/2 of the float cache (a rounding tie or a last-bit difference in K may move one level)."""
    fp, qp, scales, _ = pair[form]
    ids = token_ids(CFG, 24, seed=5)
    _, rf = _decode(fp, ids)
    _, rq = _decode(qp, ids)
    for name, s in scales.items():
        if ".0." not in name:
            continue
        f, q = rf.cache.past[name], rq.cache.past[name]
        assert q.dtype == np.int8 and q.shape == f.shape
        s4 = s.reshape(1, s.shape[0], 1, s.shape[1])
        want = np.clip(np.round(f / s4), -127, 127)
        diff = np.abs(q.astype(np.int32) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())
        assert np.all(np.abs(q * s4 - f) <= 0.5 * s4 + 1e-2 * np.abs(f).max() * (diff > 0)), name


def test_key_scales_cover_positions_past_calibration(pair):
    """Keys are cached after RoPE: the rotate-half pair norm bounds |K / s| at every position. Layer
    0's key depends only on the token, so decoding the calibration text itself to STEPS positions
    (calibrated on windows of CALIB_LEN) never clips a key there; the plain per-channel max of the
    calibration windows would."""
    fp, _, scales, _ = pair["optimum"]
    _, rf = _decode(fp, token_ids(CFG, 8 * CALIB_LEN)[:STEPS])
    calib = _runner(fp)
    calib.prefill(build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, onnx.load(str(fp)))["input_ids"])
    worst_pair, worst_plain = 0.0, 0.0
    for name, s in scales.items():
        if name != "past_key_values.0.key":
            continue
        k = np.abs(rf.cache.past[name])
        worst_pair = max(worst_pair, float((k / s.reshape(1, s.shape[0], 1, -1)).max()))
        plain = np.abs(calib.cache.past[name]).max(axis=(0, 2)) / 127
        worst_plain = max(worst_plain, float((k / plain.reshape(1, s.shape[0], 1, -1)).max()))
    assert worst_pair <= 127 * (1 + 1e-5), worst_pair
    assert worst_plain > 127, worst_plain        # the bound is needed on this decoder


@pytest.mark.parametrize("form", BUILDS)
def test_300_decode_steps_stay_within_bounds_of_the_float_cache(pair, form):
    fp, qp, _, _ = pair[form]
    ids = token_ids(CFG, STEPS + 8, seed=11)
    lf, _ = _decode(fp, ids)
    lq, rq = _decode(qp, ids)
    err = np.abs(lq - lf)
    assert err.max() <= MAX_REL * np.abs(lf).max(), (err.max(), np.abs(lf).max())
    assert err.mean() <= MEAN_REL * np.abs(lf).mean(), (err.mean(), np.abs(lf).mean())
    assert (lq.argmax(-1) == lf.argmax(-1)).mean() >= TOP1
    assert rq.cache.length == STEPS + 8
    qbytes = sum(a.nbytes for a in rq.cache.past.values())
    assert qbytes * 4 == sum(a.size * 4 for a in rq.cache.past.values())   # 1 byte per value


def test_folded_scales_equal_dequantize_then_float_and_both_forms_agree(pair):
    """Q·diag(s)·K̂ᵀ and (P·V̂)·diag(s) are the dequantized attention reordered; the
    decomposed graph and GroupQueryAttention's int8 cache compute the same function."""
    ids = token_ids(CFG, 40, seed=3)
    folded, _ = _decode(pair["optimum"][1], ids)
    plain, _ = _decode(pair["optimum"][3], ids)
    gqa, _ = _decode(pair["genai"][1], ids)
    scale = np.abs(folded).max()
    assert np.abs(folded - plain).max() <= 1e-4 * scale
    assert np.abs(folded - gqa).max() <= 2e-2 * scale     # scales calibrated per graph: same data
    counts = {n.op_type for n in onnx.load(str(pair["optimum"][1])).graph.node}
    assert "QuantizeLinear" in counts and "Cast" in counts


def test_int8_graph_io_and_data_builder(pair):
    m = onnx.load(str(pair["optimum"][1]))
    lay = past_layout(m)
    assert {p.dtype for p in lay.past} == {np.dtype(np.int8)}
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert all(outs[p.present] == onnx.TensorProto.INT8 for p in lay.past)
    data = build_data(token_ids(CFG, 200), 32, 4, m)
    assert data[lay.past_names[0]].dtype == np.int8 and data[lay.past_names[0]].shape[2] == 0
    floaty = build_data(token_ids(CFG, 200), 32, 4, onnx.load(str(pair["optimum"][0])))
    assert conform_empty_past(lay, floaty)[lay.past_names[0]].dtype == np.int8


def test_a_float_past_with_values_is_one_line(pair):
    fp, qp, _, _ = pair["optimum"]
    _, rf = _decode(fp, token_ids(CFG, 12))
    r = _runner(qp)
    batch = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, 13), np.int64),
             "position_ids": np.array([[12]]), **rf.cache.past}
    with pytest.raises(GraphpassError, match="is float32, graph expects int8"):
        r.run_batch(batch)
    assert conform_empty_past(r.layout, batch)[r.layout.past_names[0]].dtype == np.float32


def _float_present(path, out_path) -> None:
    """The int8-cache graph, but returning its dequantized float cache as present.*: what it
    returns is a float past for its int8 past inputs."""
    g = gs.import_onnx(onnx.load(str(path)))
    for i, o in enumerate(list(g.outputs)):
        if o.name.startswith("present."):
            cast = next(n for n in o.outputs if n.op == "Cast")
            cast.outputs[0].shape, cast.outputs[0].dtype = o.shape, np.float32
            g.outputs[i] = cast.outputs[0]
            cast.outputs[0].name, o.name = o.name, o.name + ".int8"
    onnx.save(gs.export_onnx(g.cleanup()), out_path)


def test_generate_and_bench_reject_a_float_cache_in_one_line(pair, tmp_path, capsys):
    from test_generate import PROMPT, _word_tokenizer

    bad = tmp_path / "bad.onnx"
    _float_present(pair["optimum"][1], bad)
    _word_tokenizer(tmp_path / "tok.json")
    err = cli_error(capsys, ["generate", bad, "--tokenizer", tmp_path / "tok.json", "--prompt", PROMPT])
    assert "is float32 but past input 'past_key_values.0.key' takes int8" in err
    err = cli_error(capsys, ["bench", bad, "--reference", pair["optimum"][0], "--decode",
                             "--prompt-len", 8, "--steps", 2, "--seconds", 0.1])
    assert "is float32 but past input 'past_key_values.0.key' takes int8" in err


def test_quantize_cli_kv_cache_alone_and_eval_in_decode_mode(tmp_path, capsys):
    from conftest import write_folder

    m = build_optimum_past(CFG)
    src = write_folder(tmp_path / "src", m, "causal-lm", build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, m))
    out = tmp_path / "kv8.onnx"
    o, _ = cli_ok(capsys, ["quantize", src, "-o", out, "--scheme", "none", "--no-smooth",
                           "--kv-cache", "int8", "--data", src.parent / "data.npz"])
    assert "decomposed caches in int8, 4 with scales folded" in o
    assert {p.dtype for p in past_layout(onnx.load(str(out))).past} == {np.dtype(np.int8)}
    o, _ = cli_ok(capsys, ["eval", out, "--reference", src, "--data", src.parent / "data.npz",
                           "--decode-from", 16])
    ratio = float(o.split("(")[1].split("x)")[0])
    assert 0.9 < ratio < 1.1, o
    assert "--kv-cache" in cli_error(capsys, ["quantize", src, "-o", tmp_path / "x.onnx", "--scheme", "none",
                                              "--no-smooth", "--data", src.parent / "data.npz"])
    assert "go with --kv-cache" in cli_error(capsys, ["quantize", src, "-o", tmp_path / "x.onnx", "--kv-smooth", "1",
                                                      "--data", src.parent / "data.npz"])


@pytest.mark.parametrize("form", BUILDS)
def test_key_smoothing_is_exact_in_float_through_rope(pair, form, tmp_path):
    """σ folded into the q / k projection columns (packed qkv in the genai form): the float graph's
    logits over 40 decode steps stay put; the cached keys are divided by σ."""
    from graphpass.passes.kv_smooth import key_factors, smooth_keys

    fp = pair[form][0]
    ab = cache_absmax(fp, build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, onnx.load(str(fp))), 2, progress=False)
    sig = key_factors(ab, 1.0)
    assert all(np.all(s.max(axis=1) == 1.0) and s.min() < 0.8 for s in sig.values())   # a real rescale
    g = gs.import_onnx(onnx.load(str(fp)))
    assert smooth_keys(g, sig) == (CFG.layers, [])
    onnx.save(gs.export_onnx(g), tmp_path / "smooth.onnx")
    ids = token_ids(CFG, 48, seed=2)
    lf, rf = _decode(fp, ids)
    ls, rs = _decode(tmp_path / "smooth.onnx", ids)
    assert np.abs(ls - lf).max() <= 1e-4 * np.abs(lf).max()
    k, s = rf.cache.past["past_key_values.0.key"], sig["past_key_values.0.key"]
    np.testing.assert_allclose(rs.cache.past["past_key_values.0.key"], k / s[None, :, None, :],
                               rtol=1e-3, atol=1e-4 * np.abs(k).max())


def test_smoothing_refuses_factors_that_differ_on_rope_pairs():
    from graphpass.passes.kv_smooth import key_factors

    a = np.ones((2, 8), np.float32)
    a[0, 1] = 3.0                      # channel 1 without its pair 5
    with pytest.raises(GraphpassError, match="RoPE channel pairs"):
        key_factors({"past_key_values.0.key": a})
    with pytest.raises(GraphpassError, match=r"\[0, 1\]"):
        key_factors({"past_key_values.0.key": np.ones((2, 8), np.float32)}, 1.5)


def test_smoothing_lets_one_scale_per_head_round_keys_like_per_channel(pair, tmp_path, capsys):
    """Layer 0's keys, read back in the unsmoothed basis: one scale per head alone rounds the small
    channels coarsely; after σ at alpha 1 every channel's step is its own range / 127. Error per
    (head, channel) = rms(K̂ - K) / max|K|, averaged."""
    from conftest import write_folder
    from graphpass.passes.kv_smooth import key_factors, smooth_keys

    fp = pair["optimum"][0]
    m = onnx.load(str(fp))
    data = build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, m)
    ab = cache_absmax(fp, data, 2, progress=False)
    sig = key_factors(ab, 1.0)
    ids, name = token_ids(CFG, 64, seed=4), "past_key_values.0.key"
    _, rf = _decode(fp, ids)
    k = rf.cache.past[name]
    err = {}
    for label, smooth in (("head", False), ("head+smooth", True)):
        g = gs.import_onnx(m)
        stat = ab
        if smooth:
            smooth_keys(g, sig)
            stat = {n: a / sig[n] if n in sig else a for n, a in ab.items()}
        sc = cache_scales(stat, "head")
        quantize_kv_cache(g, sc)
        onnx.save(gs.export_onnx(g), tmp_path / f"{label}.onnx")
        _, rq = _decode(tmp_path / f"{label}.onnx", ids)
        back = rq.cache.past[name] * sc[name][None, :, None, :] * (sig[name][None, :, None, :] if smooth else 1)
        rms = np.sqrt(np.mean((back - k) ** 2, axis=(0, 2)))
        err[label] = float(np.mean(rms / np.abs(k).max(axis=(0, 2))))
    assert err["head+smooth"] < 0.8 * err["head"], err      # 0.0033 vs 0.0049 on this decoder
    src = write_folder(tmp_path / "src", m, "causal-lm", data)
    o, _ = cli_ok(capsys, ["quantize", src, "-o", tmp_path / "cli.onnx", "--scheme", "none", "--no-smooth",
                           "--kv-cache", "int8", "--kv-scales", "head", "--kv-smooth", "1",
                           "--data", src.parent / "data.npz"])
    assert f"{CFG.layers} layers: key channels moved into the query" in o


def test_kv_cache_composes_with_w8a8_and_decode_fusions(tmp_path, capsys):
    """token W8A8 (+ --decode-fusions, whose attention rule does not match this builder's form) +
    --kv-cache int8: the W8A8 graph's cache in int8, decoding as closely to the W8A8 float-cache
    graph as the bounds above say."""
    from conftest import write_folder

    m = build_optimum_past(CFG)
    src = write_folder(tmp_path / "src", m, "causal-lm", build_data(token_ids(CFG, 8 * CALIB_LEN), CALIB_LEN, 8, m))
    common = ["--scheme", "token", "--alpha", "0.5", "--decode-fusions", "--data", src.parent / "data.npz"]
    cli_ok(capsys, ["quantize", src, "-o", tmp_path / "w8.onnx", *common])
    o, _ = cli_ok(capsys, ["quantize", src, "-o", tmp_path / "w8kv.onnx", *common, "--kv-cache", "int8"])
    assert f"{2 * CFG.layers} decomposed caches in int8" in o and "linear layers in int8 (token)" in o
    ids = token_ids(CFG, 100, seed=9)
    lf, _ = _decode(tmp_path / "w8.onnx", ids)
    lq, rq = _decode(tmp_path / "w8kv.onnx", ids)
    assert {a.dtype for a in rq.cache.past.values()} == {np.dtype(np.int8)}
    assert np.abs(lq - lf).mean() <= MEAN_REL * np.abs(lf).mean()


def test_a_cache_read_outside_the_repeat_kv_chain_is_dequantized_with_the_reason(pair, tmp_path):
    """An identity Transpose between present.0.value and its MatMul: the scale cannot be folded
    (it says why), the cache is read back as Cast · s instead, and the logits match the folded graph."""
    fp, folded, scales, _ = pair["optimum"]
    g = gs.import_onnx(onnx.load(str(fp)))
    present = next(t for t in g.outputs if t.name == "present.0.value")
    reader = next(n for n in present.outputs)
    moved = gs.Variable("present0v_t", np.float32)
    g.nodes.append(gs.Node("Transpose", inputs=[present], outputs=[moved], attrs={"perm": [0, 1, 2, 3]}))
    reader.inputs[reader.inputs.index(present)] = moved
    rep = quantize_kv_cache(g, scales)
    assert (rep.concat, rep.folded) == (2 * CFG.layers, 2 * CFG.layers - 1)
    assert "past_key_values.0.value': scale not folded (Transpose" in rep.skipped[0]
    onnx.save(gs.export_onnx(g), tmp_path / "odd.onnx")
    ids = token_ids(CFG, 30, seed=8)
    a, _ = _decode(tmp_path / "odd.onnx", ids)
    b, _ = _decode(folded, ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("form", BUILDS)
def test_value_statistic_is_the_plain_max_and_key_the_pair_norm(pair, form):
    """Regression: is_key read 'past_key_values.0.value' as a key (its name before the last '_'
    ends in 'key'), so value caches took the RoPE pair-norm bound, coarser than their |max|."""
    from graphpass.calibrate.kv import is_key

    assert [is_key(n) for n in ("past_key_values.0.key", "past_key_values.0.value", "past_key_3",
                                "past_value_3", "past_key", "past_value")] == [True, False, True, False, True, False]
    fp = pair[form][0]
    m = onnx.load(str(fp))
    data = build_data(token_ids(CFG, 4 * CALIB_LEN), CALIB_LEN, 4, m)
    got = cache_absmax(fp, data, 0, batch_size=4, progress=False)
    lay = past_layout(m)
    vals = dict(zip(lay.present_names, make_session(fp, 1).run(lay.present_names, data)))
    for p in lay.past:
        c = vals[p.present]
        half = c.shape[-1] // 2
        pair_norm = np.sqrt(c[..., :half] ** 2 + c[..., half:] ** 2)
        want = np.concatenate([pair_norm, pair_norm], -1) if p.name.endswith("key") else np.abs(c)
        np.testing.assert_allclose(got[p.name], want.max(axis=(0, 2)), rtol=1e-5, err_msg=p.name)


def test_kv_cache_errors_come_before_any_output_is_written(synth, tmp_path, capsys):
    """Regression: a no-cache graph, no --data, or data without past inputs were found only after
    the quantized graph had been saved: the error left a graph without the int8 cache at -o."""
    from conftest import write_folder

    s = synth("llama")
    out = tmp_path / "x.onnx"
    assert "with-past graph" in cli_error(capsys, ["quantize", s.path, "-o", out, "--no-smooth", "--kv-cache", "int8",
                                                   "--data", s.data_path], absent=[out])
    m = build_optimum_past(CFG)
    src = write_folder(tmp_path / "src", m, "causal-lm", build_data(token_ids(CFG, 4 * CALIB_LEN), CALIB_LEN, 4, m))
    assert "needs calibration data" in cli_error(capsys, ["quantize", src, "-o", out, "--no-smooth", "--scheme",
                                                          "dynamic", "--kv-cache", "int8"], absent=[out])
    assert "lacks the past input" in cli_error(capsys, ["quantize", src, "-o", out, "--no-smooth", "--kv-cache",
                                                        "int8", "--data", s.data_path], absent=[out])


def test_scheme_none_refuses_weight_options():
    """Regression: --scheme none took --lm-head / --embedding-int8 / --skip and ignored them."""
    from graphpass.pipeline import PipelineConfig

    for kw in (dict(lm_head=True), dict(embedding_int8=True), dict(skip=("x",))):
        with pytest.raises(GraphpassError, match="quantizes none"):
            PipelineConfig(scheme="none", alpha=None, kv_cache="int8", **kw)
    PipelineConfig(scheme="none", alpha=None, kv_cache="int8")
    with pytest.raises(GraphpassError, match=r"\[0, 1\]"):     # at config time, not after calibrating the cache
        PipelineConfig(scheme="none", alpha=None, kv_cache="int8", kv_smooth=1.5)


def test_key_smoothing_takes_keys_by_the_same_rule_as_calibration():
    """Regression: key_factors (and kv_concat's fold) took a key by name.endswith('key'), so caches
    named past_key_%d (genai_config.json may name them so) were calibrated as keys but never
    smoothed (nor folded into the query)."""
    from graphpass.passes.kv_smooth import key_factors

    a = np.array([[1.0, 4.0, 1.0, 4.0]], np.float32)
    got = key_factors({"past_key_3": a, "past_value_3": a, "past_key_values.0.key": a,
                       "past_key_values.0.value": a}, 1.0)
    assert set(got) == {"past_key_3", "past_key_values.0.key"}
    np.testing.assert_allclose(got["past_key_3"], [[0.25, 1.0, 0.25, 1.0]])
