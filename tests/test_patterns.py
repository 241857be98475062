"""Smoothing sites (graphpass.match.sites.analyze): the exact sites of each synthetic architecture,
every linear layer accounted for once, matching by structure only."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import (RMS_VARIANTS, VARIANTS, make_model, node, norm_nodes, ort_runs, run)
from graphpass.match.sites import LinearFold, NormFold, analyze
from graphpass.testing.synthetic import (SyntheticConfig, build_llama, build_postln_encoder,
                                 build_prenorm_decoder, random_inputs)


def _kinds(an) -> Counter:
    return Counter(s.kind for s in an.sites)


def _readers(an) -> dict[str, list[str]]:
    """site anchor -> reader node names (builder names say what each layer is)."""
    return {s.anchor: [lin.name for lin in s.consumers] for s in an.sites}


def _leaf(name: str) -> str:
    """'/model/layers.0/self_attn/q_proj/MatMul' -> 'layers.0/q_proj'."""
    parts = name.strip("/").split("/")
    return f"{parts[1]}/{parts[-2]}" if len(parts) > 3 else parts[-2]


# ---------------------------------------------------------------------------- exact sites
@pytest.mark.parametrize("layers", [1, 3])
def test_prenorm_decoder_sites(layers):
    an = analyze(build_prenorm_decoder(SyntheticConfig(layers=layers)))
    assert _kinds(an) == {"layernorm": 2 * layers + 1, "attn": layers}
    want = {}
    for i in range(layers):
        h = f"/transformer/h.{i}"
        want[f"{h}/ln_1/LayerNormalization"] = [f"{h}/attn/{p}_proj/MatMul" for p in "qkv"]
        want[f"{h}/attn/v_proj/MatMul"] = [f"{h}/attn/c_proj/MatMul"]
        want[f"{h}/ln_2/LayerNormalization"] = [f"{h}/mlp/c_fc/MatMul"]
    want["/transformer/ln_f/LayerNormalization"] = ["/lm_head/MatMul"]
    assert _readers(an) == want
    assert all(not s.fold.clone for s in an.sites if isinstance(s.fold, NormFold))
    assert [n for n, _ in an.uncovered] == [f"/transformer/h.{i}/mlp/c_proj/MatMul" for i in range(layers)]
    assert all("Mul" in why and "--allow-mul" in why for _, why in an.uncovered)  # Gelu's last Mul


@pytest.mark.parametrize("variant", RMS_VARIANTS)
def test_llama_sites_for_every_rms_form(synth, variant):
    an = analyze(synth(variant).model)
    L = SyntheticConfig().layers
    assert _kinds(an) == {"rmsnorm": 2 * L, "attn": L, "glu": L}
    by_kind = {}
    for s in an.sites:
        by_kind.setdefault(s.kind, []).append(sorted(_leaf(lin.name) for lin in s.consumers))
    assert by_kind["rmsnorm"] == [sorted(f"layers.{i}/{p}" for p in ps) for i in range(L)
                                  for ps in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))]
    assert by_kind["attn"] == [[f"layers.{i}/o_proj"] for i in range(L)]
    assert by_kind["glu"] == [[f"layers.{i}/down_proj"] for i in range(L)]
    assert [_leaf(s.anchor) for s in an.sites if s.kind == "glu"] == [f"layers.{i}/up_proj" for i in range(L)]
    assert [n for n, _ in an.uncovered] == ["/lm_head/MatMul"]
    assert "tied" in an.uncovered[0][1]
    assert an.unfoldable == []  # a tied head is not offered to --allow-mul either


def test_postln_encoder_sites_clone_their_norm():
    L = SyntheticConfig().layers
    an = analyze(build_postln_encoder(SyntheticConfig()))
    assert _kinds(an) == {"layernorm": 2 * L, "attn": L}
    norms = [s for s in an.sites if s.kind == "layernorm"]
    assert all(s.fold.clone for s in norms)  # each norm output also feeds a residual Add
    feeds = ["/embeddings/LayerNorm"] + [f"/encoder/layer.{i}/{w}/LayerNorm" for i in range(L)
                                          for w in ("attention/output", "output")][:-1]
    assert [s.anchor for s in norms] == [f + "/LayerNormalization" for f in feeds]
    assert [_leaf(s.consumers[0].name) for s in norms] == [
        f"layer.{i}/{w}" for i in range(L) for w in ("query", "dense")]
    fc2 = [f"/encoder/layer.{i}/output/dense/MatMul" for i in range(L)]
    assert [n for n, _ in an.uncovered] == fc2
    assert all("not a norm or a per-channel linear map" in why for _, why in an.uncovered)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_linear_is_in_one_site_or_uncovered(synth, variant):
    an = analyze(synth(variant).model)
    in_sites = Counter(lin.name for s in an.sites for lin in s.consumers)
    uncovered = Counter(n for n, _ in an.uncovered)
    for lin in an.linears:
        assert in_sites[lin.name] + uncovered[lin.name] == 1, lin.name
    assert all(why for _, why in an.uncovered)
    assert set(in_sites) | set(uncovered) == {lin.name for lin in an.linears}


@pytest.mark.parametrize("variant", RMS_VARIANTS)
def test_every_rms_form_is_an_rmsnorm(synth, variant):
    an = analyze(synth(variant).model)
    norm = [s for s in an.sites if isinstance(s.fold, NormFold)]
    assert len(norm) == 2 * SyntheticConfig().layers and all(s.kind == "rmsnorm" for s in norm)


# ---------------------------------------------------------------------------- names do not matter
def _rename_everything(m, seed: int):
    """Random names for every node and tensor except graph inputs and outputs, in place."""
    rng = np.random.default_rng(seed)
    keep = {v.name for v in m.graph.input} | {v.name for v in m.graph.output}
    tensors = {t for n in m.graph.node for t in (*n.input, *n.output)} | {t.name for t in m.graph.initializer}
    tensors -= keep | {""}
    fresh = iter(rng.permutation(10 * len(tensors) + 10 * len(m.graph.node)))
    tmap = {t: f"t{next(fresh)}" for t in sorted(tensors)}
    nmap = {}
    for n in m.graph.node:
        nmap[n.name] = n.name = f"n{next(fresh)}"
        n.input[:] = [tmap.get(i, i) for i in n.input]
        n.output[:] = [tmap.get(o, o) for o in n.output]
    for t in m.graph.initializer:
        t.name = tmap[t.name]
    for v in m.graph.value_info:
        v.name = tmap.get(v.name, v.name)
    return tmap, nmap


def _structure(an, tmap=None, nmap=None):
    tm, nm = (lambda t: tmap.get(t, t)) if tmap else (lambda t: t), (lambda n: nmap[n]) if nmap else (lambda n: n)
    sites = [(s.kind, tm(s.act), [nm(lin.name) for lin in s.consumers], nm(s.anchor),
              getattr(s.fold, "clone", None),
              None if not isinstance(s.fold, LinearFold) or s.fold.channel_map is None
              else s.fold.channel_map.tolist()) for s in an.sites]
    return sites, [nm(n) for n, _ in an.uncovered]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matching_ignores_names(synth, variant):
    s = synth(variant)
    renamed = s.fresh()
    tmap, nmap = _rename_everything(renamed, seed=len(variant))
    assert not set(tmap) & {t for n in renamed.graph.node for t in n.input}  # really renamed
    assert _structure(analyze(s.model), tmap, nmap) == _structure(analyze(renamed))
    feeds = random_inputs(s.model, 1, 5)
    out = s.model.graph.output[0].name
    np.testing.assert_array_equal(run(renamed, feeds)[out], run(s.model, feeds)[out])


# ---------------------------------------------------------------------------- Gemm, GQA
def test_gemm_trans_b_linears_read_weights_as_in_out(synth):
    an = analyze(synth("postln-gemm").model)
    gemms = [lin for lin in an.linears if lin.node.op == "Gemm"]
    assert len(gemms) == 5 * SyntheticConfig().layers
    for lin in gemms:
        stored = lin.stored(an.consts)
        assert lin.in_axis == 1 and lin.weight(an.consts).shape == stored.T.shape
        assert lin.bias_at == (lin.node, 2)
    attn = [s for s in an.sites if s.kind == "attn"]
    assert [s.fold.producer.node.op for s in attn] == ["Gemm"] * SyntheticConfig().layers


def test_gemm_encoder_has_the_same_norm_sites_as_the_matmul_encoder(synth):
    mm, gm = analyze(synth("postln").model), analyze(synth("postln-gemm").model)
    assert _kinds(gm) == _kinds(mm)
    assert [s.anchor for s in gm.sites] == [s.anchor.replace("MatMul", "Gemm") for s in mm.sites]


def test_gemm_trans_b_reading_a_norm_directly():
    rng = np.random.default_rng(0)
    w = {"w": rng.standard_normal((5, 8)).astype(np.float32), "c": np.zeros(5, np.float32)}
    nodes = norm_nodes("ln", "x", "h", 8, rng, w) + [node("Gemm", ["h", "w", "c"], "y", transB=1)]
    an = analyze(make_model(nodes, [("x", ["n", 8])], [("y", ["n", 5])], w))
    (site,) = an.sites
    assert site.kind == "layernorm" and site.consumers[0].weight(an.consts).shape == (8, 5)


def test_gqa_attention_site_has_a_channel_map(synth):
    cfg = SyntheticConfig()
    d, group = cfg.hidden // cfg.heads, cfg.heads // cfg.kv_heads
    an = analyze(synth("llama").model)
    attn = [s for s in an.sites if s.kind == "attn"]
    j = np.arange(cfg.hidden)
    for s in attn:
        assert s.fold.producer.weight(an.consts).shape == (cfg.hidden, cfg.kv_heads * d)
        np.testing.assert_array_equal(s.fold.channel_map, (j // (d * group)) * d + j % d)
    mha = analyze(build_llama(SyntheticConfig(kv_heads=cfg.heads)))
    assert all(s.fold.channel_map is None for s in mha.sites if s.kind == "attn")
    assert all(s.fold.channel_map is None for s in analyze(synth("prenorm").model).sites if s.kind == "attn")


# ---------------------------------------------------------------------------- reasons
def _one_matmul(ins, w, extra_nodes=(), attrs=None, x_shape=("n", 4)):
    nodes = [*extra_nodes, node("MatMul" if attrs is None else "Gemm", ins, "y", **(attrs or {}))]
    return make_model(nodes, [("x", list(x_shape))], [("y", None)], w)


@pytest.mark.parametrize("case, needle", [
    ("graph-input", "input is a graph input"),
    ("left-constant", "the constant is the left operand"),
    ("transA", "Gemm with transA=1"),
    ("rank3", "weight has rank 3"),
    ("relu", "input produced by Relu"),
])
def test_uncovered_reasons(case, needle):
    w4 = {"w": np.ones((4, 3), np.float32)}
    m = {
        "graph-input": lambda: _one_matmul(["x", "w"], w4),
        "left-constant": lambda: _one_matmul(["w", "x"], {"w": np.ones((3, 4), np.float32)}),
        "transA": lambda: _one_matmul(["x", "w"], w4, attrs={"transA": 1}, x_shape=(4, "n")),
        "rank3": lambda: _one_matmul(["x", "w"], {"w": np.ones((2, 4, 3), np.float32)}),
        "relu": lambda: _one_matmul(["r", "w"], w4, [node("Relu", ["x"], "r")]),
    }[case]()
    an = analyze(m)
    assert an.sites == [] and len(an.uncovered) == 1 and needle in an.uncovered[0][1]


def test_linear_producer_with_other_readers_is_refused():
    rng = np.random.default_rng(1)
    w = {"w1": rng.standard_normal((4, 6)).astype(np.float32),
         "w2": rng.standard_normal((6, 3)).astype(np.float32)}
    nodes = [node("MatMul", ["x", "w1"], "h"), node("MatMul", ["h", "w2"], "y"), node("Relu", ["h"], "r")]
    an = analyze(make_model(nodes, [("x", ["n", 4])], [("y", None), ("r", None)], w))
    assert an.sites == []
    assert ("MatMul_y", "input also feeds Relu, and its producer MatMul cannot be duplicated") in an.uncovered


def test_norm_output_that_is_a_graph_output_is_cloned():
    rng = np.random.default_rng(2)
    w = {"w": rng.standard_normal((8, 3)).astype(np.float32)}
    nodes = norm_nodes("rms_div", "x", "h", 8, rng, w) + [node("MatMul", ["h", "w"], "y")]
    m = make_model(nodes, [("x", ["n", 8])], [("y", None), ("h", None)], w)
    assert ort_runs(m)
    (site,) = analyze(m).sites
    assert site.kind == "rmsnorm" and site.fold.clone
