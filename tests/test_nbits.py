"""Weight-only MatMulNBits (passes/nbits.py): packing, op counts, the shared tied table, numerics.

Packing is checked against a numpy dequantization (unpack_reference) and against onnxruntime's
own MatMulNBits run on an identity input, which returns the dequantized weight it computes with.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpass.errors import GraphpassError
from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.match.sites import analyze
from graphpass.passes.nbits import NBitsConfig, nbits, pack, unpack_reference
from graphpass.passes.sidecars import copy_sidecars
from graphpass.testing.past import build_genai_past, genai_config
from graphpass.testing.synthetic import SyntheticConfig

MS = "com.microsoft"


def _model(nodes, inits, ins, outs, opset=18):
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    m.ir_version = 9
    return m


def _f32(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _ort_dequant(p, bits, block):
    """onnxruntime's MatMulNBits (float compute) on A = I_K: its own dequantized W [K, N]."""
    inits = [numpy_helper.from_array(p.b, "B"), numpy_helper.from_array(p.scales, "S")]
    ins = ["A", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points, "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain=MS, K=p.k, N=p.n, bits=bits, block_size=block)
    m = _model([node], inits, [_f32("A", [None, p.k])], [_f32("Y", None)])
    return make_session(m).run(["Y"], {"A": np.eye(p.k, dtype=np.float32)})[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("k", [96, 77])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_matches_numpy_reference(bits, block, k, symmetric):
    w = np.random.default_rng(k + block + bits).normal(size=(k, 24)).astype(np.float32)
    p = pack(w, bits, block, symmetric)
    kb = -(-k // block)
    assert p.b.shape == (24, kb, block * bits // 8) and p.scales.shape == (24, kb)
    assert (p.zero_points is None) == symmetric
    ref = unpack_reference(p, bits, block)
    np.testing.assert_allclose(_ort_dequant(p, bits, block), ref, rtol=0, atol=1e-6)
    # round to nearest on the block grid: every error within one step, the mean near a quarter
    step = np.abs(np.repeat(p.scales.T, block, axis=0)[:k])   # symmetric scales are signed
    err = np.abs(ref - w)
    assert (err <= step * (1 + 1e-5)).all()
    assert err.mean() < 0.4 * step.mean()


def _tied(kind: str, k: int = 96, v: int = 300):
    """Head + lookup over one table: 'genai' MatMul(x, W) + Gather(Transpose(W));
    'torch' MatMul(x, Transpose(E)) + Gather(E)."""
    w = np.random.default_rng(3).normal(size=(k, v)).astype(np.float32)
    if kind == "genai":
        nodes = [helper.make_node("Transpose", ["W"], ["T"], perm=[1, 0]),
                 helper.make_node("Gather", ["T", "ids"], ["emb"], axis=0),
                 helper.make_node("MatMul", ["x", "W"], ["logits"], name="/lm_head/MatMul")]
        inits = [numpy_helper.from_array(w, "W")]
    else:
        nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),
                 helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "ET"], ["logits"], name="/lm_head/MatMul")]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "E")]
    ins = [_f32("x", [None, k]), helper.make_tensor_value_info("ids", TensorProto.INT64, [None])]
    return _model(nodes, inits, ins, [_f32("emb", None), _f32("logits", None)]), w


@pytest.mark.parametrize("kind", ["genai", "torch"])
@pytest.mark.parametrize("block", [32, 128])     # 128 does not divide K = 96: padded, then sliced
@pytest.mark.parametrize("bits", [8, 4])
def test_tied_table_is_stored_once_for_lookup_and_head(kind, block, bits):
    m, w = _tied(kind)
    q, rep = nbits(m, NBitsConfig(bits=bits, block_size=block, accuracy_level=0))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulNBits"] == 1 and ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    assert ops["Slice"] == (1 if 96 % block else 0) and len(rep.tables) == 1
    head = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    reshape = next(n for n in q.graph.node if n.op_type == "Reshape")
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    assert reshape.input[0] == head.input[1] and gbq.input[0] == reshape.output[0]
    assert gbq.input[2] == head.input[2]                      # one set of scales too
    assert [t.name for t in q.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2] \
        == [head.input[2]]                                    # no float table left, only the scales
    table = unpack_reference(pack(w, bits, block), bits, block)   # dequantized W [K, V]
    x = np.random.default_rng(4).normal(size=(5, 96)).astype(np.float32)
    ids = np.array([0, 7, 299, 7, 150])
    emb, logits = make_session(q).run(["emb", "logits"], {"x": x, "ids": ids})
    np.testing.assert_array_equal(emb, table.T[ids])          # the lookup reads the head's bytes
    np.testing.assert_allclose(logits, x @ table, rtol=0, atol=1e-4 * np.abs(x @ table).max())


def _genai_tied(cfg: SyntheticConfig) -> onnx.ModelProto:
    """The tiny genai decoder with the builder's tied form: Gather(Transpose(lm_head weight))."""
    m = build_genai_past(cfg)
    g = m.graph
    head = next(n for n in g.node if n.op_type == "MatMul" and n.output[0] == "logits")
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight")
    nodes = list(g.node)
    nodes.insert(nodes.index(gather), helper.make_node("Transpose", [head.input[1]], ["tied_T"], perm=[1, 0]))
    gather.input[0] = "tied_T"
    g.ClearField("node")
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name != "model.embed_tokens.weight"]
    g.ClearField("initializer")
    g.initializer.extend(keep)
    return m


def _decode(model, ids, prefix=7, steps=5):
    r = DecodeRunner(make_session(model), past_layout(model))
    out = [r.prefill(ids[:, :prefix])]
    for k in range(steps):
        out.append(r.step(ids[:, prefix + k:prefix + k + 1]))
    return np.concatenate(out, axis=1)


def _dequantized_copy(model: onnx.ModelProto, block: int) -> onnx.ModelProto:
    """The float graph with every linear weight replaced by its numpy-dequantized 8-bit value
    (rebound on the shared constant, so a tied lookup reads the same dequantized table)."""
    from graphpass.graph.gs_io import import_graph, to_model

    g = import_graph(model)
    an = analyze(g)
    for lin in an.linears:
        w = unpack_reference(pack(lin.weight(an.consts), 8, block), 8, block)
        lin.weight_tensor().values = np.ascontiguousarray((w.T if lin._flip() else w).astype(np.float32))
    return to_model(g)


CFG = SyntheticConfig(hidden=64, heads=4, kv_heads=2, vocab=300, outlier_scale=4.0)


def test_op_counts_on_tiny_genai_decoder():
    m = _genai_tied(CFG)
    n_lin = len(analyze(m).linears)
    q, rep = nbits(m, NBitsConfig())
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulNBits"] == n_lin == len(rep.quantized) and ops["MatMul"] == 0
    assert ops["GatherBlockQuantized"] == 1 and ops["Transpose"] == 0
    assert all(a.i == 4 for n in q.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
               if a.name == "accuracy_level")
    q2, rep2 = nbits(_genai_tied(CFG), NBitsConfig(lm_head=False))
    assert Counter(n.op_type for n in q2.graph.node)["MatMulNBits"] == n_lin - 1
    assert rep2.skipped[0][0] == "/lm_head/MatMul" and not rep2.tables


@pytest.mark.parametrize("block", [32, 64])
def test_tiny_genai_decoder_w8_numerics_through_onnxruntime(block):
    ids = np.random.default_rng(2).integers(0, CFG.vocab, size=(2, 12))
    ref = _decode(_genai_tied(CFG), ids)
    deq = _decode(_dequantized_copy(_genai_tied(CFG), block), ids)
    exact, _ = nbits(_genai_tied(CFG), NBitsConfig(block_size=block, accuracy_level=0))
    int8, _ = nbits(_genai_tied(CFG), NBitsConfig(block_size=block, accuracy_level=4))
    scale = np.abs(ref).max()
    # float compute: the kernel computes with exactly the numpy-dequantized weights (reassociation only)
    assert np.abs(_decode(exact, ids) - deq).max() / scale < 1e-4
    # against FP32: the 8-bit weight error alone, then also int8 activations per block (level 4)
    assert np.abs(deq - ref).max() / scale < 0.05
    got = _decode(int8, ids)
    assert np.abs(got - ref).max() / scale < 0.08
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_nbits_config_errors_are_one_line():
    with pytest.raises(GraphpassError, match="block-size"):
        NBitsConfig(block_size=48)
    with pytest.raises(GraphpassError, match="bits"):
        NBitsConfig(bits=3)


def test_sidecars_name_the_output(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    (src / "tokenizer.json").write_text("{}")
    note = copy_sidecars(src / "model.onnx", out / "model_w8.onnx")
    assert "genai_config.json" in note and "tokenizer.json" in note
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model_w8.onnx"
    assert copy_sidecars(src / "model.onnx", src / "model_w8.onnx") == ""   # same folder: nothing


def test_cli_writes_a_genai_folder_with_w8(tmp_path, capsys):
    from conftest import cli_error, cli_ok
    from graphpass.graph.io import save_model

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    save_model(_genai_tied(CFG), src / "model.onnx")
    (src / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    cli_ok(capsys, ["quantize", src / "model.onnx", "-o", out / "decoder.onnx", "--scheme", "w8",
                    "--no-smooth", "--block-size", "64"])
    q = onnx.load(str(out / "decoder.onnx"))
    blocks = {a.i for n in q.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {64}
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "decoder.onnx"
    err = cli_error(capsys, ["quantize", src / "model.onnx", "-o", out / "t.onnx", "--scheme", "token",
                             "--no-smooth", "--block-size", "64"], absent=[out / "t.onnx"])
    assert "w8 / w4" in err


def test_block_activation_quantizer_keeps_an_outlier_in_its_block():
    from graphpass.search.nbits_alpha import fake_quant_act_blocks

    x = np.random.default_rng(5).normal(size=(3, 80)).astype(np.float32)
    x[:, 5] = 500.0                                   # block 0 of 32 channels only
    q = fake_quant_act_blocks(x, 32)
    assert q.shape == x.shape
    assert np.abs(q[:, 32:] - x[:, 32:]).max() <= np.abs(x[:, 32:]).max() / 127 / 2 + 1e-6
    assert np.abs(q[:, :32] - x[:, :32]).max() > 0.5   # the outlier's block lost its small values


def test_alpha_search_on_kernel_arithmetic_never_worse_than_no_smoothing():
    from graphpass.calibrate.stats import Stats
    from graphpass.search.nbits_alpha import search_alpha_nbits

    m = build_genai_past(SyntheticConfig(hidden=64, heads=4, kv_heads=2, vocab=300))
    an = analyze(m)
    rng, stats = np.random.default_rng(6), Stats()
    for s in an.sites:
        c = s.consumers[0].shape(an.consts)[0]
        x = rng.normal(size=(64, c)).astype(np.float32)
        x[:, 3] *= 60.0                                # an outlier channel, as in real LLMs
        stats.update(s.act, x.min(0), x.max(0))
        stats.rows[s.act] = x
    chosen, rows = search_alpha_nbits(an, stats, NBitsConfig(block_size=32), progress=False)
    assert len(chosen) == len(an.sites)
    assert all(r["errors"][r["alpha"]] <= r["errors"][0.0] for r in rows)
    assert any(r["alpha"] > 0 and r["errors"][r["alpha"]] < 0.9 * r["errors"][0.0] for r in rows)


@pytest.mark.parametrize("kind", ["genai", "torch"])
def test_head_bits_put_the_tied_table_in_8_bits_under_a_4_bit_body(kind):
    """w4 with head_bits 8: the head and its tied lookup read one 8-bit table (their numerics as
    for an 8-bit scheme); with --float-head the head gets no config (it is not packed)."""
    from graphpass.match.sites import analyze
    from graphpass.passes.nbits import layer_config

    m, w = _tied(kind)
    cfg = NBitsConfig(bits=4, block_size=32, accuracy_level=0, head_bits=8)
    an = analyze(m)
    head = next(lin for lin in an.linears if lin.name == "/lm_head/MatMul")
    assert layer_config(head, an.consts, cfg).bits == 8
    assert layer_config(head, an.consts, NBitsConfig(bits=4, lm_head=False)) is None
    q, _ = nbits(m, cfg)
    attrs = {n.op_type: {a.name: a.i for a in n.attribute} for n in q.graph.node}
    assert attrs["MatMulNBits"]["bits"] == 8 and attrs["GatherBlockQuantized"]["bits"] == 8
    _check_tied_table(q, w, bits=8, block=32)
    with pytest.raises(GraphpassError, match="--head-bits must be 4 or 8"):
        NBitsConfig(head_bits=2)


@pytest.mark.parametrize("kind", ["genai", "torch"])
def test_head_block_size_packs_the_head_and_its_tied_table_in_their_own_blocks(kind):
    """block 64 in the body, 32 at the head: the head's MatMulNBits and the tied lookup read one
    table packed in blocks of 32 (bit for bit the block-32 table), and K = 96 needs no padding there."""
    from graphpass.passes.nbits import layer_config

    m, w = _tied(kind)
    cfg = NBitsConfig(block_size=128, head_block_size=32, accuracy_level=0)
    an = analyze(m)
    head = next(lin for lin in an.linears if lin.name == "/lm_head/MatMul")
    assert (layer_config(head, an.consts, cfg).block_size, layer_config(head, an.consts, cfg).bits) == (32, 8)
    q, _ = nbits(m, cfg)
    attrs = {n.op_type: {a.name: a.i for a in n.attribute} for n in q.graph.node}
    assert attrs["MatMulNBits"]["block_size"] == 32 and attrs["GatherBlockQuantized"]["block_size"] == 32
    assert "Slice" not in attrs                        # 96 = 3 blocks of 32: the 128 padding is gone
    _check_tied_table(q, w, bits=8, block=32)
    with pytest.raises(GraphpassError, match="--head-block-size must be"):
        NBitsConfig(head_block_size=48)


def test_head_block_size_on_the_tiny_genai_decoder_through_the_cli(tmp_path, capsys):
    """--block-size 64 --head-block-size 16: every body layer in blocks of 64, the head and the
    lookup in 16; prefill + decode stay near FP32 and nearer than with the head in blocks of 64
    (activation rounding at accuracy level 4 is per block, so smaller head blocks round less)."""
    from conftest import cli_error, cli_ok
    from graphpass.graph.io import save_model

    src = tmp_path / "src"
    src.mkdir()
    save_model(_genai_tied(CFG), src / "model.onnx")
    (src / "genai_config.json").write_text(json.dumps(genai_config(CFG)))
    outs = {}
    for name, extra in (("h16", ["--head-block-size", "16"]), ("h64", [])):
        (tmp_path / name).mkdir()
        cli_ok(capsys, ["quantize", src / "model.onnx", "-o", tmp_path / name / "model.onnx", "--scheme", "w8",
                        "--no-smooth", "--block-size", "64", *extra])
        outs[name] = onnx.load(str(tmp_path / name / "model.onnx"))
    q = outs["h16"]
    blocks = {n.output[0] == "logits": a.i for n in q.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {True: 16, False: 64}
    assert [a.i for n in q.graph.node if n.op_type == "GatherBlockQuantized" for a in n.attribute
            if a.name == "block_size"] == [16]
    ids = np.random.default_rng(2).integers(0, CFG.vocab, size=(2, 12))
    ref = _decode(_genai_tied(CFG), ids)
    err = {k: np.abs(_decode(m, ids) - ref).max() / np.abs(ref).max() for k, m in outs.items()}
    assert err["h16"] < 0.08 and err["h16"] <= err["h64"] * 1.05
    msg = cli_error(capsys, ["quantize", src / "model.onnx", "-o", tmp_path / "t.onnx", "--scheme", "w8",
                             "--float-head", "--head-block-size", "32"], absent=[tmp_path / "t.onnx"])
    assert "--float-head" in msg and "--head-block-size" in msg
    msg = cli_error(capsys, ["quantize", src / "model.onnx", "-o", tmp_path / "t.onnx", "--scheme", "w8",
                             "--layer-block-size", "down_proj"], absent=[tmp_path / "t.onnx"])
    assert "PATTERN=SIZE" in msg


def test_layer_block_size_patterns_pick_each_layers_block():
    """'*down_proj*=16' on the tiny genai decoder: its down projections in blocks of 16, every other
    body layer in the default 32, the head in --head-block-size when given, else in its pattern's."""
    from graphpass.passes.nbits import layer_config

    m = _genai_tied(CFG)
    an = analyze(m)
    cfg = NBitsConfig(layer_blocks=(("*down_proj*", 16), ("*lm_head*", 64)))
    got = {lin.name: layer_config(lin, an.consts, cfg).block_size for lin in an.linears}
    assert {b for n, b in got.items() if "down_proj" in n} == {16}
    assert {b for n, b in got.items() if "down_proj" not in n and "lm_head" not in n} == {32}
    assert got["/lm_head/MatMul"] == 64
    head = next(lin for lin in an.linears if lin.name == "/lm_head/MatMul")
    assert layer_config(head, an.consts, replace(cfg, head_block_size=128)).block_size == 128
    q, _ = nbits(m, cfg)
    blocks = {n.name: a.i for n in q.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
              for a in n.attribute if a.name == "block_size"}
    assert sorted({b for n, b in blocks.items() if "down_proj" in n}) == [16]
    assert {b for n, b in blocks.items() if "lm_head" in n or "Gather" in n or "embed" in n} == {64}
    with pytest.raises(GraphpassError, match="layer-block-size"):
        NBitsConfig(layer_blocks=(("*", 48),))


def test_site_error_scores_each_reader_in_its_own_blocks():
    """Readers of one site packed in different blocks: the site's error is the sum of each reader
    scored alone in its own blocks (activation rounded per its blocks at level 4)."""
    from graphpass.search.nbits_alpha import site_error_nbits

    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    x[:, 3] *= 30                                              # an outlier channel: blocks matter
    ws = [rng.normal(size=(64, 24)).astype(np.float32) for _ in range(2)]
    ys = [x @ w for w in ws]
    s = np.ones(64, np.float32)
    c16, c64 = NBitsConfig(block_size=16), NBitsConfig(block_size=64)
    mixed = site_error_nbits(x, ws, ys, s, [c16, c64])
    alone = site_error_nbits(x, ws[:1], ys[:1], s, c16) + site_error_nbits(x, ws[1:], ys[1:], s, c64)
    assert mixed == pytest.approx(alone, rel=1e-12)
    assert site_error_nbits(x, ws, ys, s, c16) < mixed < site_error_nbits(x, ws, ys, s, c64)


def _check_tied_table(q, w: np.ndarray, bits: int, block: int) -> None:
    """The lookup returns the packed table's rows bit for bit; the head multiplies by the same table."""
    table = unpack_reference(pack(w, bits, block), bits, block)
    x = np.random.default_rng(4).normal(size=(5, 96)).astype(np.float32)
    ids = np.array([0, 7, 299, 7, 150])
    emb, logits = make_session(q).run(["emb", "logits"], {"x": x, "ids": ids})
    np.testing.assert_array_equal(emb, table.T[ids])
    np.testing.assert_allclose(logits, x @ table, rtol=0, atol=1e-4 * np.abs(x @ table).max())


@pytest.mark.parametrize("scheme,bits", [("w4", 4), ("w8", 8)])
def test_quantize_log_names_the_weight_bits(capsys, synth, tmp_path, scheme, bits):
    """The quantize step's line says how many bits the MatMulNBits layers hold ('in int8 (w4)'
    was printed for 4-bit layers)."""
    from conftest import cli_ok

    s = synth("llama")
    out, _ = cli_ok(capsys, ["quantize", s.path, "-o", tmp_path / "q.onnx", "--scheme", scheme,
                             "--no-smooth", "--no-awq"])
    assert f"linear layers in {bits} bits ({scheme})" in out and "int8 (w" not in out


def test_quantize_log_names_the_layers_in_other_bits(capsys, synth, tmp_path):
    """With --w4-keep-8bit and --head-bits 8 the line counts the 8-bit layers too ('211 linear
    layers in 4 bits (w4)' was printed with 57 of them and the head in 8 bits)."""
    from conftest import cli_ok

    s = synth("llama")
    out, _ = cli_ok(capsys, ["quantize", s.path, "-o", tmp_path / "q.onnx", "--scheme", "w4", "--no-smooth",
                             "--data", s.data_path, "--w4-keep-8bit", "2", "--head-bits", "8", "--lm-head"])
    assert "linear layers in 4 bits, 2 of them in 8 bits, the LM head in 8 bits (w4)" in out
