"""decode_attention: GroupQueryAttention at one new token -> attention over the concatenated cache.

Numerics through onnxruntime on the tiny optimum-form decoder (tests/decode_tiny.py) after the
decode fusions: the rewritten graph is run at one token per row only (its contract), against the
fused graph, over real pasts from a prefill: batch 2 with left padding and own positions, and a
row whose every key is masked (GroupQueryAttention gives 0 there, Softmax alone would give NaN).
Tolerance: |Δ| <= 1e-4 + 1e-4·|y| on logits and present states (float summation order only).
Through the pipeline (`--scheme w4 --decode-fusions --decode-route`): the prefill branch is the
w4 graph bit for bit, decode steps match it within the same tolerance at accuracy_level 0 (float
compute, so no activation rounding can flip), and the weights are stored once.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from decode_tiny import run as _run  # noqa: E402
from decode_tiny import session as _sess  # noqa: E402
from decode_tiny import tiny_decoder  # noqa: E402

from graphpass.graph.gs_io import initializers, names  # noqa: E402
from graphpass.passes.decode import fuse_decode  # noqa: E402
from graphpass.passes.decode_attention import attend_one_token  # noqa: E402
from graphpass.testing.past import build_genai_past  # noqa: E402

ATOL, RTOL = 1e-4, 1e-4


def _past(r: dict) -> dict:
    return {k.replace("present", "past_key_values"): v for k, v in r.items() if k.startswith("present")}


def _unfused(m: onnx.ModelProto) -> tuple[onnx.ModelProto, int, list[str]]:
    g = gs.import_onnx(m)
    n, why = attend_one_token(g, 18, names(g))
    out = gs.export_onnx(g)
    out.ir_version = m.ir_version
    return out, n, why


@pytest.fixture(scope="module")
def graphs():
    fused, _ = fuse_decode(tiny_decoder(layers=2, heads=6, kv=2, d=8))
    one, n, why = _unfused(fused)
    return fused, one, n, why


def test_every_gqa_rewritten_into_plain_ops(graphs):
    fused, one, n, why = graphs
    ops = [x.op_type for x in one.graph.node]
    assert n == 2 and not why and "GroupQueryAttention" not in ops
    assert ops.count("Concat") >= 4 and ops.count("Softmax") == 2
    assert [i.name for i in one.graph.input] == [i.name for i in fused.graph.input]
    assert [o.name for o in one.graph.output] == [o.name for o in fused.graph.output]


def test_decode_steps_match_gqa_with_padding_and_positions(graphs):
    fused, one, _, _ = graphs
    a, b = _sess(fused), _sess(one)
    ids = np.arange(14, dtype=np.int64).reshape(2, 7) % 64
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0                                            # row 1 left-padded by three
    pos = np.array([[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 0, 1, 2, 3]], np.int64)
    r = _run(a, fused, ids, None, mask, pos)                   # prefill by the fused graph
    pa = pb = _past(r)
    for t in range(3):                                         # decode: one token per row
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        step = np.array([[7 + t], [4 + t]], np.int64)
        tok = np.array([[5 + t], [9 + t]], np.int64)
        ra, rb = _run(a, fused, tok, pa, mask, step), _run(b, one, tok, pb, mask, step)
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], atol=ATOL, rtol=RTOL, err_msg=k)
        pa, pb = _past(ra), _past(rb)


def test_row_with_every_key_masked_reads_zero_as_gqa(graphs):
    fused, one, _, _ = graphs
    rng = np.random.default_rng(2)
    past = {i.name: rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
            for i in fused.graph.input if i.name.startswith("past")}
    mask = np.ones((2, 6), np.int64)
    mask[0] = 0                                                # row 0 may read nothing
    ids, pos = np.array([[3], [4]], np.int64), np.array([[5], [5]], np.int64)
    ra, rb = _run(_sess(fused), fused, ids, past, mask, pos), _run(_sess(one), one, ids, past, mask, pos)
    assert np.isfinite(rb["logits"]).all()
    for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], atol=ATOL, rtol=RTOL, err_msg=k)


def test_rotary_inside_gqa_is_kept_with_reason():
    """The builder's GroupQueryAttention rotates q and k itself (positions from seqlens_k)."""
    g = gs.import_onnx(build_genai_past())
    n, why = attend_one_token(g, 18, names(g))
    assert n == 0 and why and "do_rotary" in why[0]


def test_w4_route_prefill_exact_decode_close_weights_once(tmp_path):
    from graphpass.graph.decode import DecodeRunner, past_layout
    from graphpass.graph.runtime import make_session
    from graphpass.passes.nbits import NBitsConfig
    from graphpass.pipeline import PipelineConfig, quantize

    onnx.save(tiny_decoder(layers=2, heads=6, kv=2, d=8), tmp_path / "m.onnx")
    nb = NBitsConfig(bits=4, block_size=16, accuracy_level=0)
    for tag, route in (("w4", False), ("route", True)):
        cfg = PipelineConfig(scheme="w4", alpha=None, decode_fusions=True, decode_route=route, nbits=nb)
        quantize(tmp_path / "m.onnx", tmp_path / f"{tag}.onnx", None, cfg, progress=False, log=lambda *_: None)
    plain, route = onnx.load(tmp_path / "w4.onnx"), onnx.load(tmp_path / "route.onnx")
    (node,) = [n for n in route.graph.node if n.op_type == "If"]
    dec, pre = (next(a.g for a in node.attribute if a.name == k) for k in ("then_branch", "else_branch"))
    assert "GroupQueryAttention" not in [n.op_type for n in dec.node]
    assert [n.op_type for n in pre.node].count("GroupQueryAttention") == 2
    size = lambda m: sum(int(np.prod(t.dims)) for t in initializers(m))  # noqa: E731
    assert size(route) <= size(plain) + 1000                   # weights in the main graph, once
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 12))
    runs = [DecodeRunner(make_session(p), past_layout(onnx.load(p)))
            for p in (tmp_path / "w4.onnx", tmp_path / "route.onnx")]
    np.testing.assert_array_equal(runs[1].prefill(ids[:, :8]), runs[0].prefill(ids[:, :8]))
    for k in range(8, 12):
        a, b = runs[0].step(ids[:, k:k + 1]), runs[1].step(ids[:, k:k + 1])
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=RTOL)
