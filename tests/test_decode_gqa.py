"""decode_gqa: exported attention with a KV cache -> GroupQueryAttention + RotaryEmbedding.

Numerics through onnxruntime on the tiny optimum-form decoder (tests/decode_tiny.py): prefill with
an empty past, then decode steps feeding present back, batch 2 with left padding, position ids
that are not 0..n. Tolerance: |Δ| <= 1e-4 + 1e-4·|y| on logits and present states (float32,
summation order only; the tiny model's logits are O(10)).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from decode_tiny import run as _run  # noqa: E402
from decode_tiny import session as _sess  # noqa: E402
from decode_tiny import tiny_decoder  # noqa: E402

from graphpass.passes.decode import fuse_decode  # noqa: E402

ATOL, RTOL = 1e-4, 1e-4


def _close(a: dict, b: dict, valid=None) -> None:
    for k in a:
        x, y = a[k], b[k]
        if k == "logits" and valid is not None:
            x, y = x[valid], y[valid]
        np.testing.assert_allclose(y, x, atol=ATOL, rtol=RTOL, err_msg=k)


@pytest.fixture(scope="module")
def pair():
    m = tiny_decoder(layers=2, heads=4, kv=2, d=8)
    fused, rep = fuse_decode(m)
    return m, fused, rep


def test_every_layer_rewritten_and_nodes_cut(pair):
    m, fused, rep = pair
    ops = [n.op_type for n in fused.graph.node]
    assert rep.attention == 2 and ops.count("GroupQueryAttention") == 2
    assert ops.count("RotaryEmbedding") == 4
    assert not {"Softmax", "IsNaN", "Neg"} & set(ops)
    assert len(fused.graph.node) < len(m.graph.node) / 2
    assert [i.name for i in fused.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in m.graph.output]


def test_prefill_then_decode_steps_match(pair):
    m, fused, _ = pair
    a, b = _sess(m), _sess(fused)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (1, 7)).astype(np.int64)
    ra, rb = _run(a, m, ids, None), _run(b, fused, ids, None)
    _close(ra, rb)
    for s in (1, 1, 3):            # one token twice, then three tokens against a real past
        pa = {k.replace("present", "past_key_values"): v for k, v in ra.items() if k.startswith("present")}
        pb = {k.replace("present", "past_key_values"): v for k, v in rb.items() if k.startswith("present")}
        ids = rng.integers(0, 64, (1, s)).astype(np.int64)
        ra, rb = _run(a, m, ids, pa), _run(b, fused, ids, pb)
        _close(ra, rb)


def test_batch_with_left_padding_and_own_positions(pair):
    m, fused, _ = pair
    a, b = _sess(m), _sess(fused)
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) % 64
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0                                   # row 1 left-padded by two
    pos = np.array([[0, 1, 2, 3, 4, 5], [1, 1, 0, 1, 2, 3]], np.int64)   # optimum's cumsum(mask) - 1
    ra, rb = _run(a, m, ids, None, mask, pos), _run(b, fused, ids, None, mask, pos)
    _close(ra, rb)                                    # padded query rows read 0 in both
    pa = {k.replace("present", "past_key_values"): v for k, v in ra.items() if k.startswith("present")}
    pb = {k.replace("present", "past_key_values"): v for k, v in rb.items() if k.startswith("present")}
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    nxt = np.array([[6], [4]], np.int64)
    _close(_run(a, m, np.array([[5], [9]], np.int64), pa, mask2, nxt),
           _run(b, fused, np.array([[5], [9]], np.int64), pb, mask2, nxt))


def test_positions_past_any_table(pair):
    """The tables are the graph's own rows, so a position far beyond any max length stays exact."""
    m, fused, _ = pair
    ids = np.array([[3, 4, 5]], np.int64)
    pos = np.array([[100000, 100001, 100002]], np.int64)
    _close(_run(_sess(m), m, ids, None, positions=pos), _run(_sess(fused), fused, ids, None, positions=pos))


def test_mask_without_causal_conjunct_is_left_with_reason():
    m = tiny_decoder(layers=1, causal=False)
    fused, rep = fuse_decode(m, norms=False)
    assert rep.attention == 0 and fused is m
    assert "LessOrEqual" in rep.skipped[0]


def test_head_size_not_a_multiple_of_8_is_left_with_reason():
    """onnxruntime's CPU GroupQueryAttention refuses a head size that is not a multiple of 8 at run
    time: such attention stays as exported, and the graph runs and matches."""
    m = tiny_decoder(layers=1, heads=4, kv=2, d=4)
    fused, rep = fuse_decode(m, norms=False)
    assert rep.attention == 0 and "multiple of 8" in rep.skipped[0]
    ids = np.array([[3, 5, 7]], np.int64)
    _close(_run(_sess(m), m, ids, None), _run(_sess(fused), fused, ids, None))


def test_rotate_half_split_elsewhere_is_left():
    m = tiny_decoder(layers=1)
    for n in m.graph.node:           # split at d/4 instead of d/2: not RotaryEmbedding's function
        if n.op_type == "Div":
            for init in m.graph.initializer:
                if init.name == n.input[1] and onnx.numpy_helper.to_array(init).size == 1 \
                        and onnx.numpy_helper.to_array(init).item() == 2:
                    init.CopyFrom(onnx.numpy_helper.from_array(np.array(4, np.int64), init.name))
    fused, rep = fuse_decode(m, norms=False)
    assert rep.attention == 0 and "half the head size" in rep.skipped[0]


def test_pipeline_hook_quantized_graph_still_fuses(tmp_path):
    """PipelineConfig(decode_fusions=True): the rewrites run after W8A8 and the saved graph passes
    the save check; its outputs match the same quantization without them (float rounding only,
    so the tolerance is that of the tests above, on int8 logits)."""
    from graphpass.pipeline import PipelineConfig, quantize

    src = tmp_path / "m.onnx"
    onnx.save(tiny_decoder(layers=2), src)
    cfg = dict(scheme="token", alpha=None)
    quantize(src, tmp_path / "plain.onnx", None, PipelineConfig(**cfg), progress=False, log=lambda *_: None)
    quantize(src, tmp_path / "fused.onnx", None, PipelineConfig(**cfg, decode_fusions=True), progress=False,
             log=lambda *_: None)
    plain, fused = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "fused.onnx")
    assert [n.op_type for n in fused.graph.node].count("GroupQueryAttention") == 2
    assert [n.op_type for n in fused.graph.node].count("MatMulIntegerToFloat") == \
        [n.op_type for n in plain.graph.node].count("MatMulIntegerToFloat") > 0
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    _close(_run(_sess(plain), plain, ids, None), _run(_sess(fused), fused, ids, None))
