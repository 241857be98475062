"""nbits_pack: MatMulNBits layers reading one activation -> one MatMulNBits + Split.

Bit for bit: the packed graph's outputs equal the unpacked graph's exactly (onnxruntime CPU), at
one row and at many, 4 and 8 bits, with and without zero points, accuracy levels 0 and 4. A
weight read by another node (a tied table's lookup) and layers with other block sizes stay apart.
In the decode fusions of a w4 tiny decoder: q/k/v and gate/up packed per layer, prefill and decode
logits unchanged to the bit.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from decode_tiny import tiny_decoder
from graphpass.graph.gs_io import names
from graphpass.graph.runtime import make_session
from graphpass.passes.nbits_pack import pack_nbits

K = 96


def _layers(bits: int, block: int, level: int, zp: bool, sizes=(48, 16, 16), blocks=None, seed=0):
    """Three MatMulNBits on x; block of layer i = blocks[i] (default: all `block`)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i, n in enumerate(sizes):
        bs = (blocks or [block] * len(sizes))[i]
        kb = -(-K // bs)
        inits += [nh.from_array(rng.integers(0, 256, (n, kb, bs * bits // 8), dtype=np.uint8), f"b{i}"),
                  nh.from_array((rng.random((n, kb)) * 0.02 + 0.001).astype(np.float32), f"s{i}")]
        ins = ["x", f"b{i}", f"s{i}"]
        if zp:
            inits.append(nh.from_array(rng.integers(0, 256, (n, -(-kb * bits // 8)), dtype=np.uint8), f"z{i}"))
            ins.append(f"z{i}")
        nodes.append(h.make_node("MatMulNBits", ins, [f"y{i}"], name=f"l{i}", domain="com.microsoft", K=K, N=n,
                                 bits=bits, block_size=bs, accuracy_level=level))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, "s", K])],
                     [h.make_tensor_value_info(f"y{i}", T.FLOAT, None) for i in range(len(sizes))], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)], ir_version=9)


def _packed(m: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    g = gs.import_onnx(m)
    n = pack_nbits(g, names(g), 18)
    out = gs.export_onnx(g)
    out.ir_version = m.ir_version
    return out, n


@pytest.mark.parametrize("bits,block,level,zp", [(4, 32, 4, False), (4, 64, 0, True), (8, 32, 4, False),
                                                 (8, 16, 4, True)])
def test_packed_outputs_are_the_same_bits(bits, block, level, zp):
    m = _layers(bits, block, level, zp)
    p, n = _packed(m)
    assert n == 3 and [x.op_type for x in p.graph.node].count("MatMulNBits") == 1
    a, b = make_session(m), make_session(p)
    for s in (1, 5):
        x = np.random.default_rng(s).standard_normal((1, s, K)).astype(np.float32)
        for u, v in zip(a.run(None, {"x": x}), b.run(None, {"x": x})):
            np.testing.assert_array_equal(v, u)


def test_other_block_and_shared_weight_stay_apart():
    m = _layers(4, 32, 4, False, blocks=[32, 32, 16])
    m.graph.node.append(h.make_node("Identity", ["b1"], ["b1_view"]))      # b1 read by another node
    m.graph.output.append(h.make_tensor_value_info("b1_view", T.UINT8, None))
    _, n = _packed(m)
    assert n == 0


def test_w4_decoder_packs_qkv_and_gate_up_bit_for_bit(tmp_path):
    from graphpass.graph.decode import DecodeRunner, past_layout
    from graphpass.passes.decode import fuse_decode
    from graphpass.pipeline import PipelineConfig, quantize

    onnx.save(tiny_decoder(layers=2), tmp_path / "m.onnx")
    quantize(tmp_path / "m.onnx", tmp_path / "w4.onnx", None, PipelineConfig(scheme="w4", alpha=None),
             progress=False, log=lambda *_: None)
    w4 = onnx.load(tmp_path / "w4.onnx")
    (plain, _), (packed, rep) = fuse_decode(w4, pack=False), fuse_decode(w4)
    ops = lambda m: [n.op_type for n in m.graph.node]  # noqa: E731
    assert rep.packed == 5 * 2 and ops(packed).count("MatMulNBits") == ops(plain).count("MatMulNBits") - 3 * 2
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 10))
    a, b = (DecodeRunner(make_session(m), past_layout(m)) for m in (plain, packed))
    np.testing.assert_array_equal(b.prefill(ids[:, :7]), a.prefill(ids[:, :7]))
    for k in range(7, 10):
        np.testing.assert_array_equal(b.step(ids[:, k:k + 1]), a.step(ids[:, k:k + 1]))


@pytest.mark.parametrize("k", [32, 64])
def test_float_and_packed_zero_points_stay_apart(k):
    """MatMulNBits takes zero points as packed uint8 [N, ceil(blocks·bits/8)] or as float [N, blocks]:
    one concatenation of both would read the uint8 bytes as float zero points (one block per row:
    same shape, wrong values) or fail (two blocks: other shapes)."""
    rng = np.random.default_rng(k)
    kb, nodes, inits = k // 32, [], []
    for i, (n, zf) in enumerate(((16, False), (8, True))):
        z = (rng.random((n, kb)) * 15).astype(np.float32) if zf else \
            rng.integers(0, 256, (n, -(-kb * 4 // 8)), dtype=np.uint8)
        inits += [nh.from_array(rng.integers(0, 256, (n, kb, 16), dtype=np.uint8), f"b{i}"),
                  nh.from_array((rng.random((n, kb)) * 0.02 + 0.001).astype(np.float32), f"s{i}"),
                  nh.from_array(z, f"z{i}")]
        nodes.append(h.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}", f"z{i}"], [f"y{i}"], name=f"l{i}",
                                 domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=0))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, "s", k])],
                     [h.make_tensor_value_info(f"y{i}", T.FLOAT, None) for i in range(2)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)], ir_version=9)
    p, n = _packed(m)
    assert n == 0
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    for u, v in zip(make_session(m).run(None, {"x": x}), make_session(p).run(None, {"x": x})):
        np.testing.assert_array_equal(v, u)
