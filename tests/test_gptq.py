"""GPTQ rounding (search/gptq.py, passes/gptq.py), its packing (passes/nbits_codes.py), the Gram
matrices calibration sums for it (calibrate/gram.py), and AWQ scoring a head on its own grid."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run
from graphpass.calibrate.stats import Stats
from graphpass.graph.gs_io import export_into
from graphpass.match.sites import analyze
from graphpass.passes.awq import awq
from graphpass.passes.gptq import gptq
from graphpass.passes.nbits import NBitsConfig, nbits, pack, unpack_reference
from graphpass.passes.nbits_codes import pack_codes
from graphpass.search.gptq import DAMP, gptq_round, hessian
from graphpass.search.nbits_alpha import fake_quant_weight_blocks, site_error_nbits

GPTQ_GAIN = 0.7      # on correlated inputs GPTQ's output error is at most this fraction of RTN's


def _correlated(k: int, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))).astype(np.float32)


@pytest.mark.parametrize("bits,block,k,symmetric", [(4, 32, 96, True), (4, 128, 200, True), (4, 64, 77, False),
                                                   (8, 32, 70, True), (8, 128, 300, False)])
def test_gptq_output_error_below_rtn_on_the_same_grid(bits, block, k, symmetric):
    """Same block grid, same scale rule: GPTQ's ||X·W − X·W_q||² on the calibration rows is at
    most GPTQ_GAIN of round-to-nearest's; every code lies in the grid."""
    x = _correlated(k, 4 * k, seed=k)
    w = np.random.default_rng(bits).normal(size=(k, 24)).astype(np.float32)
    r = gptq_round(w, hessian(x.T.astype(np.float64) @ x, len(x)), bits, block, symmetric)
    rtn = fake_quant_weight_blocks(w, NBitsConfig(bits=bits, block_size=block, symmetric=symmetric))
    err = lambda q: float(((x @ (w - q)) ** 2).sum())  # noqa: E731
    assert err(r.dequantized) <= GPTQ_GAIN * err(rtn)
    assert r.codes.shape == w.shape and r.codes.max() <= 2 ** bits - 1
    assert r.scales.shape == (24, -(-k // block))


@pytest.mark.parametrize("bits,block,k,symmetric", [(4, 32, 96, True), (4, 64, 77, False), (4, 32, 80, False),
                                                   (8, 16, 50, True), (8, 32, 70, False)])
def test_packed_codes_dequantize_to_what_gptq_chose(bits, block, k, symmetric):
    """pack_codes lays the codes out as MatMulNBits reads them: the numpy reference dequantizes
    them to GPTQ's W_q bit for bit (odd K padded, odd block counts of 4-bit zero points)."""
    x = _correlated(k, 3 * k, seed=1)
    w = np.random.default_rng(2).normal(size=(k, 10)).astype(np.float32)
    r = gptq_round(w, hessian(x.T.astype(np.float64) @ x, len(x)), bits, block, symmetric)
    p = pack_codes(r.codes, r.scales, r.zero_points, bits, block)
    assert p.b.shape == (10, -(-k // block), block * bits // 8)
    np.testing.assert_array_equal(unpack_reference(p, bits, block), r.dequantized)


ACT_ORDER_GAIN = 0.8   # on skewed channel scales act-order's error is at most this fraction of natural order's


def _skewed(k: int, rows: int, seed: int) -> np.ndarray:
    """Correlated rows whose channel scales spread over e^±2 (log-normal), as LLM activations do."""
    scale = np.exp(np.random.default_rng(seed + 100).normal(size=k)).astype(np.float32)
    return _correlated(k, rows, seed) * scale


@pytest.mark.parametrize("seed,k,block,symmetric", [(0, 256, 128, True), (2, 256, 128, True),
                                                    (3, 200, 64, False), (4, 130, 32, True)])
def test_act_order_lowers_the_hessian_weighted_error(seed, k, block, symmetric):
    """Static groups + decreasing diag(H): tr(D^T·H·D) of act-order GPTQ is at most ACT_ORDER_GAIN
    of natural-order GPTQ's on a layer whose input channels differ in scale."""
    x = _skewed(k, 4 * k, seed)
    w = np.random.default_rng(seed).normal(size=(k, 48)).astype(np.float32)
    h = hessian(x.T.astype(np.float64) @ x, len(x))
    err = lambda q: float(((x @ (w - q)) ** 2).sum())  # noqa: E731
    plain = gptq_round(w, h, 4, block, symmetric)
    ordered = gptq_round(w, h, 4, block, symmetric, act_order=True)
    assert err(ordered.dequantized) <= ACT_ORDER_GAIN * err(plain.dequantized)


@pytest.mark.parametrize("bits,block,k", [(4, 128, 300), (4, 32, 77), (8, 64, 130)])
def test_act_order_grid_is_the_packers_and_packs_bit_for_bit(bits, block, k):
    """Static groups: each block's scale is the one onnxruntime's packer derives from the unrounded
    weight; the codes, packed contiguously in K (no g_idx), dequantize to GPTQ's W_q exactly."""
    x = _skewed(k, 3 * k, seed=5)
    w = np.random.default_rng(6).normal(size=(k, 16)).astype(np.float32)
    r = gptq_round(w, hessian(x.T.astype(np.float64) @ x, len(x)), bits, block, True, act_order=True)
    np.testing.assert_array_equal(r.scales, pack(w, bits, block, True).scales)
    p = pack_codes(r.codes, r.scales, None, bits, block)
    np.testing.assert_array_equal(unpack_reference(p, bits, block), r.dequantized)


@pytest.mark.parametrize("act_order,symmetric,bits", [(True, True, 4), (False, True, 4), (True, False, 8)])
def test_gptq_error_from_its_own_steps_is_the_hessian_weighted_error(act_order, symmetric, bits):
    """Rounded.h_error, Σ e_k² − λ̄·||D||² from GPTQ's steps (no product with H), is tr(D^T·H·D)
    of its weight error D (a dead input channel included, whose H row is 0)."""
    x = _skewed(160, 640, seed=9)
    x[:, 7] = 0.0
    w = np.random.default_rng(10).normal(size=(160, 24)).astype(np.float32)
    h = hessian(x.T.astype(np.float64) @ x, len(x))
    r = gptq_round(w, h, bits, 32, symmetric, act_order=act_order)
    d = (w - r.dequantized).astype(np.float64)
    assert r.h_error == pytest.approx(float(np.einsum("kn,kn->", d, h @ d)), rel=1e-4)


def test_dead_input_channels_get_zero_weight_and_no_nan():
    x = _correlated(64, 200, seed=3)
    x[:, 5] = 0.0
    w = np.random.default_rng(4).normal(size=(64, 8)).astype(np.float32)
    r = gptq_round(w, hessian(x.T.astype(np.float64) @ x, len(x)), 4, 32, True)
    assert np.isfinite(r.dequantized).all() and (r.dequantized[5] == 0).all()


def _textbook_codes(w: np.ndarray, h: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The OBQ recursion without lazy batches (natural order, symmetric, float32): each row's error
    is taken out of every later row at once; the block grid is fixed at the block's first row."""
    from graphpass.search.gptq import inverse_factor

    u = inverse_factor(h, DAMP)[0].astype(np.float32)
    wk, codes, half = w.astype(np.float32).copy(), np.zeros(w.shape, np.uint8), 2 ** (bits - 1)
    for i in range(len(wk)):
        if i % block == 0:
            v = np.take_along_axis(wk[i:i + block], np.abs(wk[i:i + block]).argmax(0)[None], 0)[0]
            scale = (v / -half).astype(np.float32)
            inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale != 0)
        c = np.clip(np.rint(wk[i] * inv), -half, half - 1)
        codes[i] = c + half
        wk[i + 1:] -= np.outer(u[i, i + 1:], (wk[i] - c * scale) / u[i, i])
    return codes


@pytest.mark.parametrize("k,block", [(300, 128), (96, 32), (70, 16)])
def test_lazy_updates_are_the_textbook_recursion(k, block):
    """The two-level lazy update (sub-batches of 16 gathering their corrections, matrix products
    for the rest) rounds as the unbatched OBQ recursion does: codes equal but for float ties."""
    x = _skewed(k, 4 * k, seed=k)
    w = np.random.default_rng(k).normal(size=(k, 32)).astype(np.float32)
    h = hessian(x.T.astype(np.float64) @ x, len(x))
    got = gptq_round(w, h, 4, block, True).codes
    assert np.mean(got == _textbook_codes(w, h, 4, block)) >= 0.999


@pytest.mark.parametrize("k", [64, 128, 129, 300, 1000])
def test_cholesky_inverse_is_the_inverse_of_the_factor(k):
    """By halves, M^-1 of A = M·M^T: lower triangular, M^-1·A·M^-T = I, LAPACK's factor inverted;
    a matrix that is not positive definite (here only in its second half) is refused."""
    from graphpass.search.gptq import cholesky_inverse

    rng = np.random.default_rng(k)
    x = rng.normal(size=(2 * k, k)) * np.exp(rng.normal(size=k))
    a = x.T @ x + 0.1 * np.eye(k)
    got = cholesky_inverse(a)
    assert not np.triu(got, 1).any()
    np.testing.assert_allclose(got @ a @ got.T, np.eye(k), rtol=0, atol=1e-9)
    want = np.linalg.inv(np.linalg.cholesky(a))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    a[-1, -1] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        cholesky_inverse(a)


@pytest.mark.parametrize("act_order,symmetric", [(True, True), (False, True), (True, False)])
def test_mixed_bits_round_each_column_on_its_own_grid(act_order, symmetric):
    """Readers of one input in 4 and 8 bits (--w4-keep-8bit) are rounded in one call with a bit
    count per column: the same codes, scales and zero points as one call per bit count."""
    k, bits = 200, np.array([4] * 24 + [8] * 16)
    x = _skewed(k, 4 * k, seed=7)
    w = np.random.default_rng(8).normal(size=(k, 40)).astype(np.float32)
    h = hessian(x.T.astype(np.float64) @ x, len(x))
    both = gptq_round(w, h, bits, 64, symmetric, act_order=act_order)
    for b, cols in ((4, slice(0, 24)), (8, slice(24, 40))):
        one = gptq_round(w[:, cols], h, b, 64, symmetric, act_order=act_order)
        np.testing.assert_array_equal(both.codes[:, cols], one.codes)
        np.testing.assert_array_equal(both.scales[cols], one.scales)
        np.testing.assert_array_equal(both.dequantized[:, cols], one.dequantized)
        if not symmetric:
            np.testing.assert_array_equal(both.zero_points[cols], one.zero_points)
        assert one.codes.max() > 15 if b == 8 else one.codes.max() <= 15


def test_calibration_gram_is_the_sum_over_thinned_rows(synth):
    """With every row sampled (row_step 1) and gram_step 1, Σ X^T·X equals rows^T·rows; the Grams
    are computed from rows parked on disk (no [C, C] sum is held), on every read."""
    from graphpass.calibrate.collect import calibrate

    s = synth("llama")
    st = calibrate(s.path, s.data, batch_size=2, progress=False, row_step=1, gram_step=1)
    assert set(st.gram) == set(st.min)
    for t, x in st.rows.items():
        assert st.gram.rows[t] == len(x)
        ref = x.T.astype(np.float64) @ x
        np.testing.assert_allclose(st.gram[t], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        np.testing.assert_array_equal(st.gram[t], st.gram[t])     # the spilled rows stay for a second read
    thin = calibrate(s.path, s.data, batch_size=2, progress=False, gram_step=3)
    t = next(iter(thin.gram))
    assert thin.gram.rows[t] == sum(-(-n // 3) for n in [thin.count[t] // 2] * 2) and not thin.rows


def test_gptq_graph_runs_the_codes_it_chose_and_beats_rtn(synth):
    """AWQ (clip ratios kept as block factors) then GPTQ on a synthetic Llama: MatMulNBits at
    float compute reproduces the graph holding GPTQ's dequantized float weights (so the packed
    bytes are GPTQ's codes, not re-rounded), and the Hessian-weighted error is below RTN's."""
    from graphpass.calibrate.collect import calibrate

    s = synth("llama")
    st = calibrate(s.path, s.data, batch_size=2, progress=False, row_step=2, gram_step=1)
    cfg = NBitsConfig(bits=4, block_size=32, accuracy_level=0, lm_head=False)
    an = analyze(s.fresh())
    a = awq(an, st, cfg, progress=False, apply_clip=False)
    rep = gptq(an, st, cfg, {k: ch.scales for k, ch in a.choices.items()},
               {r["linear"]: r["ratio"] for r in a.clip}, progress=False)
    n_lin = len(an.linears) - 1                       # all but the head, kept in float here
    assert len(rep.packed) == n_lin
    assert sum(r["gptq"] for r in rep.rows) < sum(r["rtn"] for r in rep.rows)
    float_model = s.fresh()
    export_into(float_model, an.graph)
    packed_model = s.fresh()
    packed_model.CopyFrom(float_model)
    q, qrep = nbits(packed_model, cfg, packed=rep.packed)
    assert len(qrep.quantized) == n_lin
    feeds = s.probe()
    ref, got = run(float_model, feeds), run(q, feeds)
    for k in ref:
        assert np.abs(ref[k] - got[k]).max() <= 1e-4 * np.abs(ref[k]).max(), k


def test_one_gram_and_one_call_per_input_whatever_the_bits(synth):
    """An input whose readers are in 4 and 8 bits (--w4-keep-8bit) is rounded in one call, on one
    Gram read once (it was one call and one S^T·S per bit count); each reader keeps its own bits."""
    from collections import Counter

    from graphpass.calibrate.collect import calibrate

    s = synth("llama")
    st = calibrate(s.path, s.data, batch_size=2, progress=False, gram_step=1)
    an = analyze(s.fresh())
    site = next(site for site in an.sites if len(site.consumers) == 3)          # q / k / v
    cfg = NBitsConfig(bits=4, block_size=32, accuracy_level=0, lm_head=False, keep8=(site.consumers[2].name,))
    reads, grams = Counter(), st.gram

    class Counted(type(grams)):
        def __getitem__(self, t):
            reads[t] += 1
            return grams[t]
    counted = Counted()
    counted.rows = grams.rows
    st.gram = counted
    rep = gptq(an, st, cfg, progress=False)
    assert reads[site.act] == 1 and max(reads.values()) == 1
    assert len(rep.rows) == len(reads)
    assert [r["readers"] for r in rep.rows if r["readers"][0] == site.consumers[0].name] == \
        [[lin.name for lin in site.consumers]]
    bits = {lin.name: rep.packed[lin.name].b.shape[2] * 8 // 32 for lin in site.consumers}
    assert list(bits.values()) == [4, 4, 8]


def test_awq_scores_a_head_on_the_grid_it_is_packed_on():
    """Regression: the AWQ search scored the LM head with the body's bits although --head-bits 8
    packs it in 8 bits, and scored a --float-head head at all. The site holding the head now
    scores each reader on its own grid."""
    from test_awq import SMALL, _outlier_stats
    from graphpass.passes.nbits import layer_config
    from graphpass.passes.quantize import is_lm_head
    from graphpass.search.awq import candidate_scales, candidates, search_awq
    from graphpass.testing.past import build_optimum_past

    an = analyze(build_optimum_past(SMALL))
    st = _outlier_stats(an)
    site = next(s for s in an.sites if any(is_lm_head(lin, an.consts) for lin in s.consumers))
    x = st.rows[site.act]
    ws = [lin.weight(an.consts).astype(np.float32) for lin in site.consumers]
    cand = candidates(None)[5]
    for cfg in (NBitsConfig(bits=4, block_size=32, head_bits=8), NBitsConfig(bits=4, block_size=32, lm_head=False)):
        got = search_awq(an, st, cfg, progress=False, max_columns=10**6)[site.name].errors[cand.label]
        s = candidate_scales(site, an, st, cand)
        want = sum(site_error_nbits(x, [w], [x @ w], s, layer_config(lin, an.consts, cfg))
                   for lin, w in zip(site.consumers, ws) if layer_config(lin, an.consts, cfg) is not None)
        body = NBitsConfig(bits=4, block_size=32)
        old = site_error_nbits(x, ws, [x @ w for w in ws], s, body)
        assert got == pytest.approx(want, rel=1e-5) and abs(got - old) > 1e-3 * old


def _eight_bit_layers(path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(path).graph.node
            if n.op_type == "MatMulNBits" and {a.name: a.i for a in n.attribute}["bits"] == 8}


def _named(names, nodes: set[str]) -> bool:
    return all(any(name.strip("/").replace("/", "_") in k for k in nodes) for name in names)


def test_keep_8bit_packs_the_layers_of_largest_4_bit_error_in_8_bits(synth, tmp_path):
    """--w4-keep-8bit N: the N layers of largest relative 4-bit output error become MatMulNBits
    bits=8 (AWQ, GPTQ and the packer all see that grid), the others stay 4-bit."""
    from graphpass.calibrate.collect import calibrate
    from graphpass.pipeline import PipelineConfig, quantize
    from graphpass.search.mixed import rank_layers

    s = synth("llama")
    cfg = NBitsConfig(bits=4, block_size=32, accuracy_level=0, head_bits=8)
    st = calibrate(s.path, s.data, batch_size=2, progress=False, row_step=2)
    ranked = rank_layers(analyze(s.fresh()), st, cfg)
    assert [e for _, e, _ in ranked] == sorted((e for _, e, _ in ranked), reverse=True) and len(ranked) > 3
    out = tmp_path / "mixed.onnx"
    quantize(s.path, out, s.data, PipelineConfig(scheme="w4", alpha=None, nbits=cfg, keep_8bit=3, gptq=True, row_step=2),
             progress=False, log=lambda m: None)
    eight = _eight_bit_layers(out)
    assert len(eight) == 3 + 1                                 # three kept layers and the 8-bit head
    assert _named([name for name, _, _ in ranked[:3]], eight)


def test_keep_8bit_cost_is_what_the_8_bit_blob_adds(synth):
    """The bytes an 8-bit layer adds are those of its packed blobs (K padded to whole blocks)."""
    from graphpass.calibrate.collect import calibrate
    from graphpass.search.mixed import rank_layers

    s = synth("llama")
    st = calibrate(s.path, s.data, batch_size=2, progress=False, row_step=2)
    an = analyze(s.fresh())
    ranked = rank_layers(an, st, NBitsConfig(bits=4, block_size=128, head_bits=8))
    weights = {lin.name: lin.weight(an.consts) for lin in an.linears}
    assert any(weights[name].shape[0] % 128 for name, _, _ in ranked)       # some K is padded
    for name, _, extra in ranked:
        w = weights[name]
        assert extra == pack(w, 8, 128).b.nbytes - pack(w, 4, 128).b.nbytes, name


def test_gptq_order_option_reaches_the_pipeline_config():
    """--gptq-order: 'act' by default, 'natural' turns act-order off; --gptq-damp sets λ (the default
    DAMP), refused outside (0, 10]; other schemes refuse both."""
    import argparse

    from graphpass.cli.nbits import add_nbits_args, with_nbits
    from graphpass.errors import GraphpassError
    from graphpass.pipeline import PipelineConfig

    p = argparse.ArgumentParser()
    add_nbits_args(p)
    cfg = lambda scheme, *args: with_nbits(PipelineConfig(scheme=scheme, alpha=None), p.parse_args(list(args)))  # noqa: E731
    assert cfg("w4", "--gptq").gptq_how.act_order
    assert not cfg("w4", "--gptq", "--gptq-order", "natural").gptq_how.act_order
    assert cfg("w4", "--gptq").gptq_how.damp == DAMP and cfg("w4", "--gptq-damp", "0.03").gptq_how.damp == 0.03
    with pytest.raises(GraphpassError, match="--gptq-damp must"):
        cfg("w4", "--gptq-damp", "0")
    for extra in (["--gptq-order", "natural"], ["--gptq-damp", "0.1"]):
        with pytest.raises(GraphpassError, match="--gptq-order, --gptq-damp"):
            cfg("token", *extra)


def test_gptq_closes_its_spilled_rows_when_done(synth, tmp_path, monkeypatch):
    """The pipeline closes the Grams' temporary file (1.6 GB of rows on SmolLM2) right after
    GPTQ has read it, not when the stats are collected at the end of the job."""
    from graphpass.calibrate.gram import Grams
    from graphpass.pipeline import PipelineConfig, quantize

    closed, real = [], Grams.close
    monkeypatch.setattr(Grams, "close", lambda self: closed.append(self) or real(self))
    s = synth("llama")
    logged = []
    quantize(s.path, tmp_path / "q.onnx", s.data, PipelineConfig(scheme="w4", alpha=None, gptq=True, row_step=2),
             progress=False, log=logged.append)
    assert len(closed) == 1 and closed[0]._rows._f.closed
    assert any(m.startswith("gptq") for m in logged)


@pytest.mark.parametrize("damp", [0.0, -0.1, 11.0])
def test_gptq_damping_out_of_range_is_a_one_line_error_through_the_api(damp):
    """GptqConfig refuses a damping the CLI would refuse; through the API, damp=0 on a singular H
    was a numpy LinAlgError."""
    from graphpass.errors import GraphpassError
    from graphpass.search.gptq import GptqConfig

    with pytest.raises(GraphpassError, match=r"GPTQ damping must lie in \(0, 10\]"):
        GptqConfig(damp=damp)
