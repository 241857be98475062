"""The searches' fast paths give the choices of their plain forms (search/blockq.py, search/clip.py,
search/pool.py, search/alpha.py): in-place block rounding equals the argmax form on ties, the clip
search per column chunk equals a per-ratio reference, the two-thread map keeps item order, and
the α search scores a site with max|W| over every output channel."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from graphpass.passes.clip import block_view, clip_blocks
from graphpass.passes.nbits import NBitsConfig
from graphpass.search import clip as clip_mod
from graphpass.search.blockq import NBitsScorer, fake_quant_act_blocks, quantize_blocks
from graphpass.search.clip import CLIP_GRID, search_clip
from graphpass.search.pool import ordered_map


def _argmax_rounding(w: np.ndarray, cfg: NBitsConfig) -> np.ndarray:
    """The packer's rounding written as in its specification: v by argmax of |w| (first on ties)."""
    k, n = w.shape
    wb = block_view(w, cfg.block_size)
    if cfg.symmetric:
        qmin, qmax = -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1
        v = np.take_along_axis(wb, np.abs(wb).argmax(axis=1)[:, None, :], 1)
        scale, zp = v / np.float32(qmin), np.float32(0)
    else:
        qmin, qmax = 0, 2 ** cfg.bits - 1
        lo = np.minimum(wb.min(axis=1, keepdims=True), 0)
        scale = (np.maximum(wb.max(axis=1, keepdims=True), 0) - lo) / np.float32(qmax)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    if not cfg.symmetric:
        zp = np.clip(np.rint(-lo * inv), qmin, qmax)
    q = np.clip(np.rint(wb * inv) + zp, qmin, qmax) - zp
    return (q * scale).reshape(-1, n)[:k]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rho", [1.0, 0.7, 0.55])
def test_block_rounding_equals_the_argmax_form_also_on_ties(bits, symmetric, rho):
    """Clipped blocks tie max and -min often; the sign of the first extreme decides the scale."""
    rng = np.random.default_rng(bits + int(rho * 100))
    w = rng.standard_t(3, size=(77, 50)).astype(np.float32)
    w[5:9, :7] = 0.0
    w[:, 3] = np.tile([2.0, -2.0], 39)[:77]                              # exact ties, both orders
    w[:, 4] = np.tile([-2.0, 2.0], 39)[:77]
    cfg = NBitsConfig(bits=bits, block_size=32, symmetric=symmetric)
    wc = clip_blocks(w, rho, 32, symmetric)
    ties = (lambda b: (b.max(1) == -b.min(1)).sum())(block_view(wc, 32))
    assert ties >= 6                                                    # the case is exercised
    fast = quantize_blocks(block_view(wc, 32), bits, symmetric).reshape(-1, 50)[:77]
    np.testing.assert_array_equal(fast, _argmax_rounding(wc, cfg))


def _clip_reference(x, w, cfg):
    """search_clip as a loop over ratios on the whole weight (clip, round, block error)."""
    xb = block_view(np.ascontiguousarray(x.T), cfg.block_size).transpose(0, 2, 1)
    errs = []
    for rho in CLIP_GRID:
        q = _argmax_rounding(clip_blocks(w, rho, cfg.block_size, cfg.symmetric), cfg)
        out = np.matmul(xb, block_view(w - q, cfg.block_size))
        errs.append(np.einsum("brn,brn->bn", out, out))
    errs = np.stack(errs)                                               # [ratios, kb, N]
    first_best = errs.argmin(axis=0)                                    # the first (largest) ρ on ties
    return np.asarray(CLIP_GRID, np.float32)[first_best], errs[0].sum(), errs.min(axis=0).sum()


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_in_column_chunks_equals_the_per_ratio_reference(symmetric, monkeypatch):
    monkeypatch.setattr(clip_mod, "CHUNK", 16)                          # 40 columns: 3 chunks
    rng = np.random.default_rng(7)
    w = rng.standard_t(3, size=(70, 40)).astype(np.float32)
    x = rng.normal(size=(24, 70)).astype(np.float32)
    cfg = NBitsConfig(bits=4, block_size=32, symmetric=symmetric)
    ratio, before, after = search_clip(x, w, cfg)
    ref_ratio, ref_before, ref_after = _clip_reference(x, w, cfg)
    assert ratio.shape == (3, 40) and (ratio < 1).any()
    np.testing.assert_array_equal(ratio, ref_ratio)
    np.testing.assert_allclose([before, after], [ref_before, ref_after], rtol=1e-5)


def test_scorer_error_is_the_plain_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 70)).astype(np.float32)
    ws = [rng.normal(size=(70, n)).astype(np.float32) for n in (9, 33)]
    s = rng.uniform(0.5, 2.0, 70).astype(np.float32)
    for level in (0, 4):
        cfg = NBitsConfig(bits=4, block_size=32, accuracy_level=level)
        scorer = NBitsScorer(x, ws, cfg)
        xq = fake_quant_act_blocks(x / s, 32) if level == 4 else x / s
        want = sum(float(((x @ w - xq @ _argmax_rounding(w * s[:, None], cfg)) ** 2).sum() / ((x @ w) ** 2).sum())
                   for w in ws)
        for _ in range(2):                                              # buffers reused: same answer
            assert scorer.error(s) == pytest.approx(want, rel=1e-5)


def test_ordered_map_keeps_item_order_skips_none_and_prepares_in_one_thread():
    prepared_in = set()

    def prepare(i):
        prepared_in.add(threading.get_ident())
        return None if i % 5 == 0 else (i,)

    def work(i):
        time.sleep(0.002 * (i % 3))                                     # later items may finish first
        return i * i

    got = list(ordered_map(prepare, work, range(23), workers=2))
    assert got == [(i, i * i) for i in range(23) if i % 5]
    assert prepared_in == {threading.get_ident()}
    assert list(ordered_map(prepare, work, range(7), workers=1)) == [(i, i * i) for i in range(7) if i % 5]


def test_ordered_map_closed_early_runs_no_queued_item():
    """A consumer that stops (an error, Ctrl-C) leaves the items already running to finish, not the
    ones still queued (up to 2 · workers + 1 are submitted: calibration windows take seconds each)."""
    started = []

    def work(i):
        started.append(i)
        time.sleep(0.5 if i else 0.0)                                   # item 0 done at once, 1 and 2 run on
        return i

    it = ordered_map(lambda i: (i,), work, range(20), workers=2)
    assert next(it) == (0, 0)
    t0 = time.perf_counter()
    while len(started) < 3 and time.perf_counter() - t0 < 0.4:         # both workers busy, 3 and 4 queued
        time.sleep(0.001)
    it.close()                                                          # what an exception in the consumer does
    assert sorted(started) == [0, 1, 2]


def test_alpha_search_error_takes_max_w_over_every_channel():
    """search_sites hands the error max|W| of the readers once per site, equal to weights_absmax."""
    from graphpass.calibrate.stats import Stats
    from graphpass.match.sites import analyze
    from graphpass.search.alpha import search_sites, weights_absmax
    from graphpass.testing.synthetic import SyntheticConfig, build_llama

    an = analyze(build_llama(SyntheticConfig(hidden=64, heads=4, kv_heads=2, vocab=300)))
    rng, st = np.random.default_rng(0), Stats()
    for site in an.sites:
        st.rows[site.act] = rng.normal(size=(8, site.consumers[0].shape(an.consts)[0])).astype(np.float32)
    seen = []

    def error(site, x, weights, ys, a, w_max):
        seen.append(np.array_equal(w_max, weights_absmax([lin.weight(an.consts) for lin in site.consumers])))
        return abs(a - 0.3)

    chosen, _ = search_sites(an, st, error, "test", progress=False)
    assert seen and all(seen) and set(chosen.values()) == {0.3}
