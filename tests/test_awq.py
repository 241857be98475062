"""AWQ for MatMulNBits (search/awq.py, search/clip.py, passes/awq.py, passes/clip.py): the fold is exact
before rounding on every site kind and adds no op, clipping never raises the block error it scores,
the numpy weight quantizer is the packer's arithmetic, and AWQ beats round-to-nearest on outliers."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import EXACT_RTOL, VARIANTS, make_model, max_rel_err, node, op_counts, run
from graphpass.calibrate.stats import Stats
from graphpass.graph.gs_io import export_into
from graphpass.match.sites import analyze
from graphpass.passes.awq import awq
from graphpass.passes.clip import clip_blocks
from graphpass.passes.nbits import NBitsConfig, pack, unpack_reference
from graphpass.search.awq import candidates, search_awq
from graphpass.search.clip import search_clip
from graphpass.search.nbits_alpha import fake_quant_weight_blocks
from graphpass.testing.past import build_genai_past, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig, build_llama, random_inputs

AWQ_GAIN = 2.0    # on outlier channels AWQ's KL must be at least this many times below RTN's
SMALL = SyntheticConfig(hidden=64, heads=4, kv_heads=2, vocab=300)


def _outlier_stats(an, seed: int = 0) -> Stats:
    """Sampled rows per site with two outlier channels (as real LLM activations have), and the
    per-channel statistics calibration would give for them."""
    rng, st = np.random.default_rng(seed), Stats()
    for site in an.sites:
        c = site.consumers[0].shape(an.consts)[0]
        x = rng.normal(size=(48, c)).astype(np.float32)
        x[:, [1, c // 2]] *= 40.0
        st.update(site.act, x.min(0), x.max(0))
        st.add_abs(site.act, np.abs(x).sum(0), len(x))
        st.rows[site.act] = x
    return st


def _linear_chain():
    """x -> MatMul W1 + b1 -> MatMul W2, W3 (a linear -> linear site) -> y2, y3."""
    rng = np.random.default_rng(5)
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in
         (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 8)), ("W3", (32, 4)))}
    nodes = [node("MatMul", ["x", "W1"], "h0"), node("Add", ["h0", "b1"], "h"),
             node("MatMul", ["h", "W2"], "y2"), node("MatMul", ["h", "W3"], "y3")]
    return make_model(nodes, [("x", ["n", 16])], [("y2", ["n", 8]), ("y3", ["n", 4])], w)


def _models():
    yield "llama", build_llama(VARIANTS["llama"][1])
    yield "llama-simplified", build_llama(VARIANTS["llama-simplified"][1])
    yield "prenorm", VARIANTS["prenorm"][0](VARIANTS["prenorm"][1])
    yield "postln-gemm", VARIANTS["postln-gemm"][0](VARIANTS["postln-gemm"][1])
    yield "optimum-past", build_optimum_past(SMALL)
    yield "genai-past", build_genai_past(SMALL)      # SkipSimplifiedLayerNormalization, GroupQueryAttention
    yield "linear", _linear_chain()


@pytest.mark.parametrize("name,model", list(_models()), ids=[n for n, _ in _models()])
def test_awq_fold_is_exact_before_rounding_and_adds_no_op(name, model):
    from graphpass.testing.past import empty_past

    an = analyze(model)
    fresh = analyze(model)
    kinds = {s.kind for s in an.sites}
    rep = awq(an, _outlier_stats(an), NBitsConfig(bits=4, block_size=32), clip=False, progress=False)
    assert set(rep.choices) == {s.name for s in an.sites}
    assert any(ch.choice.r > 0 for ch in rep.choices.values())          # something was scaled
    folded = type(model)()
    folded.CopyFrom(model)
    export_into(folded, an.graph)
    assert op_counts(folded) == op_counts(model) or _only_clones(fresh, folded, model)
    feeds = _feeds(model, folded, empty_past)
    ref, got = run(model, feeds), run(folded, feeds)
    keep = [k for k in ref if not k.startswith("present")]  # the cache holds v·diag(1/s) by design (sites.py)
    assert max_rel_err({k: ref[k] for k in keep}, {k: got[k] for k in keep}) <= EXACT_RTOL, kinds


def _only_clones(an, folded, model) -> bool:
    """A norm whose output also feeds a residual is duplicated (the smoothing fold's rule): only
    those ops may be added, and never a Mul before a reader."""
    from graphpass.match.sites import NormFold

    clones = sum((op_counts_of(site.fold.nodes) for site in an.sites
                  if isinstance(site.fold, NormFold) and site.fold.clone), start=op_counts(make_model([], [], [], {})))
    return op_counts(folded) - op_counts(model) == clones


def op_counts_of(nodes):
    from collections import Counter

    return Counter(n.op for n in nodes)


def _feeds(model, folded, empty_past):
    names = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    if names == {"x"}:
        return {"x": np.random.default_rng(1).normal(size=(6, 16)).astype(np.float32)}
    feeds = random_inputs(model, batch=2, seq=8, seed=3) if "input_ids" in names and len(names) <= 3 else None
    if feeds is None:
        feeds = {"input_ids": np.random.default_rng(3).integers(0, SMALL.vocab, (1, 8))}
        feeds.update(empty_past(model, 1))
        for n in names - set(feeds):
            feeds[n] = _extra_input(model, n)
    return feeds


def _extra_input(model, name):
    if name == "attention_mask":
        return np.ones((1, 8), np.int64)
    if name == "position_ids":
        return np.arange(8, dtype=np.int64)[None]
    return np.array([8], np.int32) if "total" in name else np.full((1, 1), 7, np.int32)


def test_candidates_include_rtn_and_smoothing_only_when_asked():
    plain = [c.label for c in candidates(None)]
    assert plain[0] == "awq 0.00" and len(plain) == 39 and not any(c.startswith("smooth") for c in plain)
    assert sum(c.startswith("smooth") for c in map(lambda c: c.label, candidates("auto"))) == 10
    assert [c.label for c in candidates(0.5)][-1] == "smooth 0.50"


def test_search_never_picks_worse_than_rtn():
    an = analyze(build_genai_past(SMALL))
    for ch in search_awq(an, _outlier_stats(an, 2), NBitsConfig(bits=4, block_size=32), progress=False).values():
        assert ch.errors[ch.choice.label] <= ch.errors["awq 0.00"] and ch.gain >= 1.0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_numpy_weight_quantizer_is_the_packers_arithmetic(bits, block, symmetric):
    """Equal to pack + unpack_reference except for rounding ties (at most 1e-4 of the weights)."""
    w = np.random.default_rng(block + bits).normal(size=(77, 40)).astype(np.float32)
    cfg = NBitsConfig(bits=bits, block_size=block, symmetric=symmetric)
    ref = unpack_reference(pack(w, bits, block, symmetric), bits, block)
    diff = np.abs(fake_quant_weight_blocks(w, cfg) - ref) > 1e-6
    assert diff.mean() <= 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_blocks_shrinks_each_block_range_by_its_ratio(symmetric):
    w = np.random.default_rng(0).normal(size=(70, 6)).astype(np.float32)
    ratio = np.random.default_rng(1).uniform(0.5, 1.0, size=(3, 6)).astype(np.float32)
    c = clip_blocks(w, ratio, 32, symmetric)
    assert c.shape == w.shape
    for b in range(3):
        blk, cb = w[32 * b:32 * (b + 1)], c[32 * b:32 * (b + 1)]
        if symmetric:
            np.testing.assert_allclose(np.abs(cb).max(0), np.abs(blk).max(0) * ratio[b], rtol=1e-6)
        else:
            np.testing.assert_allclose(cb.max(0), np.maximum(blk.max(0), 0) * ratio[b], rtol=1e-6)
            np.testing.assert_allclose(cb.min(0), np.minimum(blk.min(0), 0) * ratio[b], rtol=1e-6)
    np.testing.assert_array_equal(clip_blocks(w, 1.0, 32, symmetric), w)


def test_clip_search_never_raises_the_block_error_it_scores():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(96, 24)).astype(np.float32)      # heavy tails: clipping pays
    x = rng.normal(size=(40, 96)).astype(np.float32)
    cfg = NBitsConfig(bits=4, block_size=32)
    ratio, before, after = search_clip(x, w, cfg)
    assert ratio.shape == (3, 24) and after <= before and (ratio < 1).any()
    clipped = fake_quant_weight_blocks(clip_blocks(w, ratio, 32), cfg)
    plain = fake_quant_weight_blocks(w, cfg)
    assert ((x @ (w - clipped)) ** 2).sum() < ((x @ (w - plain)) ** 2).sum()


def test_awq_lowers_kl_against_rtn_on_outlier_channels(tmp_path):
    """Synthetic Llama with outlier activation channels, w4 block 64, float compute: the whole
    pipeline with AWQ (scales + clip) against --no-awq, KL(FP32 || w4) on held-out inputs."""
    from graphpass.graph.io import save_model
    from graphpass.pipeline import PipelineConfig, quantize
    from graphpass.validate.evaluate import evaluate

    m = build_llama(SyntheticConfig(hidden=128, heads=4, kv_heads=2, ffn=256, vocab=256, layers=1,
                                    outlier_scale=40.0))
    save_model(m, tmp_path / "fp32.onnx")
    calib, held = random_inputs(m, batch=4, seq=32, seed=1), random_inputs(m, batch=4, seq=32, seed=2)
    kl = {}
    for name, on in (("rtn", False), ("awq", True)):
        cfg = PipelineConfig(scheme="w4", alpha=None, awq=on, row_step=2,
                             nbits=NBitsConfig(bits=4, block_size=64, accuracy_level=0))
        quantize(tmp_path / "fp32.onnx", tmp_path / f"{name}.onnx", calib, cfg, progress=False, log=lambda s: None)
        kl[name] = evaluate(tmp_path / f"{name}.onnx", tmp_path / "fp32.onnx", held, progress=False)["kl"]
    assert kl["awq"] * AWQ_GAIN <= kl["rtn"], kl


def test_one_blas_thread_restores_the_thread_count():
    from graphpass.search.blas import _openblas, one_blas_thread

    get, _ = _openblas()
    if get is None:
        pytest.skip("numpy is not linked to OpenBLAS here")
    before = int(get())
    with one_blas_thread():
        assert int(get()) == 1
    assert int(get()) == before


def test_clip_leaves_a_float_head_alone_and_clips_an_8_bit_head_on_its_grid():
    """Regression: with --float-head the clip search clipped the LM head, a weight that is never
    rounded, so clipping could only add error. Now it is skipped, and --head-bits 8 clips the
    head for the 8-bit grid it is packed on."""
    from graphpass.passes.quantize import is_lm_head

    def heads(cfg):
        an = analyze(build_optimum_past(SMALL))               # the final norm's site holds the head
        rep = awq(an, _outlier_stats(an), cfg, progress=False)
        names = {lin.name for s in an.sites for lin in s.consumers if is_lm_head(lin, an.consts)}
        assert names                                      # the fixture has a head to clip
        return [r for r in rep.clip if r["linear"] in names], len(rep.clip)

    kept, n = heads(NBitsConfig(bits=4, block_size=32, lm_head=False))
    assert kept == [] and n > 0
    clipped, _ = heads(NBitsConfig(bits=4, block_size=32, head_bits=8))
    assert len(clipped) == 1
