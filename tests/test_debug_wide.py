"""graphpass debug: wide layers (an LM head over a large vocabulary) reduced in row chunks outside
the merged graph give the sums the merged graph gives (debug_wide)."""
from __future__ import annotations

import math

import pytest

from graphpass.validate import debug_graph, debug_wide
from graphpass.validate.debug import debug
from graphpass.validate.debug_graph import build_merged

RTOL = 1e-5        # float32 sums over different chunkings: reassociation only


def _by_name(res):
    return {r.name: r for r in res.layers}


@pytest.mark.parametrize("chunk", [4096, 1 << 30])     # many chunks / one chunk per batch
def test_wide_sums_equal_the_merged_graph_sums(synth, quantized, monkeypatch, chunk):
    s = synth("llama")
    q, _, _ = quantized("llama", scheme="token", lm_head=True, embedding_int8=True, alpha=0.5)
    plain = _by_name(debug(s.path, q, s.data, batch_size=2, progress=False))
    monkeypatch.setattr(debug_graph, "WIDE", 1)          # every eligible layer goes wide
    monkeypatch.setattr(debug_wide, "CHUNK_BYTES", chunk)
    mg = build_merged(s.path, q)
    try:
        wide = {mg.pairs[w.i].name for w in mg.wide}
        local = {mg.pairs[w.i].name for w in mg.wide if w.cand_act}
    finally:
        mg.folder.remove()
    assert "/lm_head/MatMul" in local and len(wide) >= 4        # the head, with its layer-alone sums
    chunked = _by_name(debug(s.path, q, s.data, batch_size=2, progress=False))
    assert chunked.keys() == plain.keys()
    for name in wide:
        a, b = plain[name], chunked[name]
        assert b.signal == pytest.approx(a.signal, rel=RTOL) and b.noise == pytest.approx(a.noise, rel=RTOL)
        if name in local:
            assert b.local_signal == pytest.approx(a.local_signal, rel=RTOL)
            assert b.local_noise == pytest.approx(a.local_noise, rel=RTOL)
    for name in plain.keys() - wide:                          # the rest is untouched
        assert chunked[name].noise == plain[name].noise


def test_wide_head_against_itself_has_no_error(synth, monkeypatch):
    s = synth("llama")
    monkeypatch.setattr(debug_graph, "WIDE", 1)
    res = _by_name(debug(s.path, s.path, s.data, progress=False))
    head = res["/lm_head/MatMul"]
    assert head.noise == 0.0 and head.sqnr_db == math.inf and head.signal > 0
    assert not list(s.dir.glob(".graphpass-debug-*"))        # head models removed with the folder
