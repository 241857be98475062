"""Bad input, tried on purpose, through the `graphpass` command: every case exits 2 with one
stderr line that names the problem, no traceback, the inputs byte-for-byte unchanged and no file
(output or temporary) left behind. Models with If / Loop around MatMuls are accepted and those
MatMuls are left alone; constant all-zero channels never divide by zero.

Cases already covered elsewhere (not repeated here): load_model on bad files and eval / bench /
calibrate / inspect on four of them (test_cli_errors), data checks through eval and text shorter
than one window (test_data), corrupted stats through smooth and merge (test_calibrate), alpha and
stats of another model through smooth (test_smooth), quantize option errors (test_pipeline)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import (EXACT_RTOL, cli_ok, invoke, make_model, max_rel_err, node, norm_nodes, run,
                      write_folder)
from graphpass.match.sites import analyze
from graphpass.testing.synthetic import SyntheticConfig, build_prenorm_decoder, random_inputs
from test_cli_errors import _bad_model

QUANT_REL_MAX = 0.05   # max |y_q - y| / max |y| of a W8A8 block on these small float graphs


# ---------------------------------------------------------------------------- helpers
def snapshot(*folders) -> dict[str, str]:
    """Every file under `folders` (hidden temporaries included) -> sha256 of its bytes."""
    out = {}
    for f in folders:
        for p in sorted(Path(f).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def refused(capsys, argv: list, needle: str, *watch) -> str:
    """Exit 2, one stderr line `graphpass CMD: error: ...` holding `needle`, `watch` unchanged."""
    before = snapshot(*watch)
    capsys.readouterr()
    rc = invoke(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"graphpass {argv[0]}: error: "), err
    assert "Traceback" not in out + err
    assert needle in lines[0], lines[0]
    assert snapshot(*watch) == before, "an input changed or a file was left behind"
    return lines[0]


@pytest.fixture
def work(synth, calibrated, tmp_path):
    """(saved prenorm folder, its stats file, an empty output folder)."""
    s = synth("prenorm")
    (tmp_path / "st").mkdir()
    calibrated("prenorm").save(tmp_path / "st" / "s.npz")
    (tmp_path / "out").mkdir()
    return s, tmp_path / "st" / "s.npz", tmp_path / "out"


def _every_command(bad: Path, s, stats: Path, out: Path) -> list[list]:
    """Each command that reads a model, with `bad` in the model's place."""
    return [["calibrate", bad, "--data", s.data_path, "-o", out / "s.npz"],
            ["smooth", bad, "--stats", stats, "-o", out / "m.onnx"],
            ["quantize", bad, "--data", s.data_path, "-o", out / "q.onnx"],
            ["eval", bad, "--reference", s.path, "--data", s.data_path, "--json", out / "m.json"],
            ["eval", s.path, "--reference", bad, "--data", s.data_path],
            ["bench", bad, "--reference", s.path, "--shape", "1x4", "--seconds", "0.05"],
            ["inspect", bad, "--stats", stats]]


# ---------------------------------------------------------------------------- model files
def _float16_model(weights_only: bool) -> onnx.ModelProto:
    """LayerNorm -> MatMul in float16 (everything, or only the weights behind Casts)."""
    rng = np.random.default_rng(0)
    h16 = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    w = [numpy_helper.from_array(a, n) for n, a in
         (("g", h16(8)), ("b", h16(8)), ("W", h16(8, 4)))]
    io_t = TensorProto.FLOAT if weights_only else TensorProto.FLOAT16
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("LayerNormalization", ["x16", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "W"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=io_t)]
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", io_t, ["n", 8])],
                          [helper.make_tensor_value_info("y", io_t, ["n", 4])], w)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


def _broken(model: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if kind == "undefined-input":
        g.node[5].input[0] = "no_such_tensor"
    elif kind == "unknown-op":
        g.node.append(helper.make_node("FooBar", [g.output[0].name], ["foo"], name="foo"))
    elif kind == "two-producers":
        g.node[7].output[0] = g.node[6].output[0]
    elif kind == "unsorted":
        nodes = list(g.node)[::-1]
        g.ClearField("node")
        g.node.extend(nodes)
    elif kind == "opset-11":
        m.opset_import[0].version = 11
    return m


NEW_BAD = {  # kind -> words the one-line error must hold
    "undefined-input": "invalid ONNX graph, onnx.checker says: Nodes in a graph must be topologically "
                       "sorted, however input 'no_such_tensor'",
    "unknown-op": "invalid ONNX graph, onnx.checker says: No Op registered for FooBar",
    "two-producers": "single static assignment",
    "unsorted": "invalid ONNX graph, onnx.checker says: Nodes in a graph must be topologically sorted",
    "opset-11": "opset 11 is older than 13; convert it first",
    "float16": "float16 model ('x' is float16); graphpass rewrites float32 graphs",
    "float16-weights": "float16 model ('g' is float16)",
}
OLD_BAD = ["missing", "directory", "empty", "truncated", "random-bytes", "tensor-proto",
           "external-missing", "external-truncated", "external-outside", "external-absolute"]


@pytest.mark.parametrize("kind", OLD_BAD + list(NEW_BAD))
def test_every_command_refuses_a_bad_model(capsys, tmp_path, work, kind):
    s, stats, out = work
    src = tmp_path / "src"
    src.mkdir()
    if kind in NEW_BAD:
        bad, needle = src / "bad.onnx", NEW_BAD[kind]
        m = _float16_model(kind == "float16-weights") if kind.startswith("float16") else _broken(s.model, kind)
        onnx.save(m, str(bad))
    else:
        bad, needle = _bad_model(kind, src, s.model)
    for argv in _every_command(bad, s, stats, out):
        msg = refused(capsys, argv, needle, src, out, s.dir, stats.parent)
        assert str(bad) in msg or bad.name in msg, msg


@pytest.mark.parametrize("scheme", ["static", "dynamic", "token"])
def test_opset_13_the_oldest_accepted_quantizes(capsys, tmp_path, scheme):
    """The other side of the opset-11 refusal: an opset-13 graph (linear -> linear) goes through."""
    rng = np.random.default_rng(0)
    w = {"W1": rng.standard_normal((8, 16)).astype(np.float32), "b": np.ones(16, np.float32),
         "W2": rng.standard_normal((16, 4)).astype(np.float32)}
    m = make_model([node("MatMul", ["x", "W1"], "h"), node("Add", ["h", "b"], "hb"),
                    node("MatMul", ["hb", "W2"], "z"), node("Relu", ["z"], "y")],
                   [("x", ["n", 8])], [("y", ["n", 4])], w, opset=13)
    m.ir_version = 7
    path = write_folder(tmp_path / "m", m, "encoder")
    x = rng.standard_normal((6, 8)).astype(np.float32)
    np.savez(tmp_path / "m" / "d.npz", x=x)
    cli_ok(capsys, ["quantize", path, "--data", tmp_path / "m" / "d.npz", "--scheme", scheme,
                    "-o", tmp_path / "q.onnx"])
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert q.opset_import[0].version == 13
    assert 0 < max_rel_err(run(m, {"x": x}), run(q, {"x": x})) <= QUANT_REL_MAX


# ---------------------------------------------------------------------------- control flow
def control_flow_model(kind: str, c: int = 8) -> onnx.ModelProto:
    """h = LN(x); y_top = Relu(h·W_top); a node with subgraphs holding MatMuls reads h:
      if:        y_cf = If(max x > 0, then: h·W_a, else: sigmoid(x)·W_b); y_after = Relu(y_cf·W_after)
      if-shared: the same, the then-branch reads W_top (one weight, a top-level and a branch reader)
      loop:      y_cf = Loop(2 trips, v <- v·W_sq, v0 = h)
    sigmoid(x) is read only inside the else-branch (calibration must keep its producer)."""
    rng = np.random.default_rng(0)
    w: dict = {}
    nodes = norm_nodes("ln", "x", "h", c, rng, w, gamma_boost=[2])
    w["W_top"] = rng.standard_normal((c, 6)).astype(np.float32)
    nodes += [node("MatMul", ["h", "W_top"], "y_mm"), node("Relu", ["y_mm"], "y_top")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    outs = [("y_top", ["b", "s", 6])]
    if kind.startswith("if"):
        w["W_a"], w["W_b"] = (rng.standard_normal((c, 6)).astype(np.float32) for _ in range(2))
        w["W_after"], w["zero"] = rng.standard_normal((6, 4)).astype(np.float32), np.float32(0)
        then_w = "W_top" if kind == "if-shared" else "W_a"
        then_g = helper.make_graph([helper.make_node("MatMul", ["h", then_w], ["t"], name="then/MatMul")],
                                   "then", [], [vi("t")])
        else_g = helper.make_graph([helper.make_node("MatMul", ["sx", "W_b"], ["e"], name="else/MatMul")],
                                   "else", [], [vi("e")])
        nodes += [node("Sigmoid", ["x"], "sx"), node("ReduceMax", ["x"], "mx", keepdims=0),
                  node("Greater", ["mx", "zero"], "cond"),
                  helper.make_node("If", ["cond"], ["y_cf"], name="If", then_branch=then_g, else_branch=else_g),
                  node("MatMul", ["y_cf", "W_after"], "y_am"), node("Relu", ["y_am"], "y_after")]
        outs.append(("y_after", ["b", "s", 4]))
    else:
        w["trip"], w["W_sq"] = np.array(2, np.int64), (0.3 * rng.standard_normal((c, c))).astype(np.float32)
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"]),
             helper.make_node("MatMul", ["v_in", "W_sq"], ["v_out"], name="loop/MatMul")], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), vi("v_in")],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), vi("v_out")])
        nodes.append(helper.make_node("Loop", ["trip", "", "h"], ["y_cf"], name="Loop", body=body))
        outs.append(("y_cf", ["b", "s", c]))
    m = make_model(nodes, [("x", ["b", "s", c])], outs, w)
    onnx.checker.check_model(m, full_check=True)
    return m


def _subgraph_reads(m: onnx.ModelProto) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """The serialized subgraphs, and the initializers they read (by name)."""
    graphs = [a.g for n in m.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    names = {i for g in graphs for n in g.node for i in n.input}
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in names}
    return [g.SerializeToString() for g in graphs], inits


@pytest.mark.parametrize("kind", ["if", "if-shared", "loop"])
def test_matmuls_inside_control_flow_are_left_alone(capsys, tmp_path, kind):
    m = control_flow_model(kind)
    path = write_folder(tmp_path / "m", m, "encoder")
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    x[..., 2] *= 30.0
    np.savez(tmp_path / "m" / "data.npz", x=x)
    d, before = tmp_path / "m", snapshot(tmp_path / "m")
    cli_ok(capsys, ["calibrate", path, "--data", d / "data.npz", "-o", tmp_path / "s.npz"])
    out, _ = cli_ok(capsys, ["inspect", path, "--stats", tmp_path / "s.npz"])
    assert "1 smoothing sites" in out
    branch = [ln for ln in out.splitlines() if "inside a branch of" in ln]   # listed, with the reason
    assert len(branch) == (1 if kind == "loop" else 2), out
    cli_ok(capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "-o", tmp_path / "sm.onnx"])
    for scheme in ("token", "static"):
        cli_ok(capsys, ["quantize", path, "--data", d / "data.npz", "--scheme", scheme,
                        "-o", tmp_path / f"q_{scheme}.onnx"])
    cli_ok(capsys, ["eval", tmp_path / "q_token.onnx", "--reference", path, "--data", d / "data.npz",
                    "--kind", "encoder"])
    assert snapshot(d) == before
    graphs, weights = _subgraph_reads(m)
    probe = {"x": np.random.default_rng(2).standard_normal((2, 7, 8)).astype(np.float32) * 3}
    ref = run(m, probe)
    sm = onnx.load(str(tmp_path / "sm.onnx"))
    assert max_rel_err(ref, run(sm, probe)) <= EXACT_RTOL
    for scheme in ("token", "static"):
        q = onnx.load(str(tmp_path / f"q_{scheme}.onnx"))
        floats = {t.name for t in q.graph.initializer if t.data_type == TensorProto.FLOAT}
        assert not [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in floats]
        got_graphs, got_weights = _subgraph_reads(q)
        assert got_graphs == graphs     # branch MatMuls untouched ...
        assert got_weights.keys() == weights.keys()    # ... and so are the weights they read
        assert all(np.array_equal(got_weights[k], weights[k]) for k in weights)
        got = run(q, probe)
        branch = "y_cf" if kind == "loop" else None    # reads only h, whose norm was duplicated
        if branch:
            assert max_rel_err({branch: ref[branch]}, {branch: got[branch]}) <= EXACT_RTOL
        assert max_rel_err(ref, got) <= QUANT_REL_MAX


# ---------------------------------------------------------------------------- data
def _data_case(case: str, s) -> tuple[dict, str]:
    ids = s.data["input_ids"]
    return {
        "missing": ({"other": ids}, "missing graph input(s) input_ids"),
        "extra": ({"input_ids": ids, "labels": ids}, "labels are not graph inputs"),
        "dtype": ({"input_ids": ids.astype(np.float32)}, "'input_ids' is float32, graph expects int64"),
        "rank": ({"input_ids": ids[..., None]}, "'input_ids' has rank 3, graph expects 2"),
        "zero-samples": ({"input_ids": ids[:0]}, "zero samples"),
        "empty-sequence": ({"input_ids": ids[:, :0]}, "'input_ids' has shape [4, 0]: an axis is empty"),
        "id-out-of-range": ({"input_ids": ids + 10_000}, "onnxruntime failed on these inputs (Gather node. "
                            "Name:'/transformer/wte/Gather' Status Message: indices element out of data bounds"),
        "longer-than-positions": ({"input_ids": np.tile(ids, (1, 40))},
                                  "Name:'/transformer/wpe/Gather' Status Message: indices element out of"),
    }[case]


DATA_CASES = ["missing", "extra", "dtype", "rank", "zero-samples", "empty-sequence", "id-out-of-range",
              "longer-than-positions"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_calibrate_and_quantize_refuse_bad_data(capsys, tmp_path, work, case):
    s, stats, out = work
    arrays, needle = _data_case(case, s)
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "d.npz", **arrays)
    data = tmp_path / "d" / "d.npz"
    watch = (tmp_path / "d", out, s.dir)
    refused(capsys, ["calibrate", s.path, "--data", data, "-o", out / "s.npz"], needle, *watch)
    refused(capsys, ["quantize", s.path, "--data", data, "-o", out / "q.onnx"], needle, *watch)
    if case in ("empty-sequence", "id-out-of-range", "longer-than-positions"):   # new to eval
        refused(capsys, ["eval", s.path, "--reference", s.path, "--data", data, "--json", out / "m.json"],
                needle, *watch)


def test_bench_shape_longer_than_positions(capsys, work):
    s, _, out = work
    refused(capsys, ["bench", s.path, "--reference", s.path, "--shape", "1x600", "--json", out / "b.json"],
            "Name:'/transformer/wpe/Gather' Status Message: indices element out of data bounds", out, s.dir)


@pytest.mark.parametrize("payload, needle", [
    ("pickle", "holds pickled objects; refusing to load them"),
    ("onnx", "not a readable .npz (not a zip archive)"),   # np.load would try to unpickle it
])
def test_calibrate_and_quantize_never_unpickle(capsys, tmp_path, work, payload, needle):
    s, stats, out = work
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "d.npz"
    if payload == "pickle":
        np.savez(data, input_ids=np.array([{"a": 1}, None], dtype=object))
    else:
        shutil.copy(s.path, data)
    watch = (tmp_path / "d", out, s.dir)
    refused(capsys, ["calibrate", s.path, "--data", data, "-o", out / "s.npz"], needle, *watch)
    refused(capsys, ["quantize", s.path, "--data", data, "-o", out / "q.onnx"], needle, *watch)
    refused(capsys, ["smooth", s.path, "--stats", data, "-o", out / "m.onnx"], needle, *watch)


def _float_block(c: int = 8, zero=(), all_zero: bool = False) -> onnx.ModelProto:
    """x float [b, s, c] -> LayerNorm(γ, β) -> ·W1 -> ·W2 -> Relu; γ_j = β_j = 0 on `zero` channels."""
    rng = np.random.default_rng(0)
    g = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    b = (0.1 * rng.standard_normal(c)).astype(np.float32)
    g[list(zero)], b[list(zero)] = 0.0, 0.0
    if all_zero:
        g[:], b[:] = 0.0, 0.0
    w = {"g": g, "b": b, "W1": rng.standard_normal((c, 5)).astype(np.float32),
         "W2": rng.standard_normal((5, 3)).astype(np.float32)}
    nodes = [node("LayerNormalization", ["x", "g", "b"], "h", axis=-1, epsilon=1e-5),
             node("MatMul", ["h", "W1"], "y1"), node("MatMul", ["y1", "W2"], "y2"), node("Relu", ["y2"], "y")]
    return make_model(nodes, [("x", ["b", "s", c])], [("y", ["b", "s", 3])], w)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_calibrate_and_quantize_refuse_nan_and_inf(capsys, tmp_path, value):
    path = write_folder(tmp_path / "m", _float_block(), "encoder")
    x = np.ones((2, 3, 8), np.float32)
    x[1, 2, 5] = value
    np.savez(tmp_path / "m" / "d.npz", x=x)
    (tmp_path / "out").mkdir()
    watch = (tmp_path / "m", tmp_path / "out")
    for argv in (["calibrate", path, "--data", tmp_path / "m" / "d.npz", "-o", tmp_path / "out" / "s.npz"],
                 ["quantize", path, "--data", tmp_path / "m" / "d.npz", "-o", tmp_path / "out" / "q.onnx"]):
        refused(capsys, argv, "'x' holds NaN or Inf values", *watch)


@pytest.mark.parametrize("all_zero", [False, True])
def test_all_zero_channels_never_divide_by_zero(capsys, tmp_path, all_zero):
    """γ_j = β_j = 0: channel j of the norm output is exactly 0 on every input (all of them with
    all_zero, so the static range is [0, 0]). Every scheme runs without a numpy warning, writes
    finite weights and stays within QUANT_REL_MAX (exact zeros when the whole tensor is 0)."""
    zero = (1, 4)
    m = _float_block(zero=zero, all_zero=all_zero)
    path = write_folder(tmp_path / "m", m, "encoder")
    x = np.random.default_rng(3).standard_normal((3, 4, 8)).astype(np.float32)
    np.savez(tmp_path / "m" / "d.npz", x=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)    # "divide by zero", "invalid value"
        cli_ok(capsys, ["calibrate", path, "--data", tmp_path / "m" / "d.npz", "-o", tmp_path / "s.npz"])
        cli_ok(capsys, ["smooth", path, "--stats", tmp_path / "s.npz", "-o", tmp_path / "sm.onnx"])
        for scheme in ("static", "dynamic", "token"):
            cli_ok(capsys, ["quantize", path, "--data", tmp_path / "m" / "d.npz", "--scheme", scheme,
                            "--alpha", "0.5", "-o", tmp_path / f"q_{scheme}.onnx"])
    ref = run(m, {"x": x})["y"]
    for name in ("sm", "q_static", "q_dynamic", "q_token"):
        q = onnx.load(str(tmp_path / f"{name}.onnx"))
        arrays = [numpy_helper.to_array(t) for t in q.graph.initializer]
        assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), name
        got = run(q, {"x": x})["y"]
        if all_zero:
            assert np.array_equal(got, ref) and not ref.any(), name
        else:
            assert np.abs(got - ref).max() <= QUANT_REL_MAX * np.abs(ref).max(), name


# ---------------------------------------------------------------------------- stats and options
def test_inspect_refuses_stats_of_another_model(capsys, work, calibrated, tmp_path):
    s, _, out = work
    calibrated("llama").save(out.parent / "st" / "llama.npz")
    refused(capsys, ["inspect", s.path, "--stats", out.parent / "st" / "llama.npz"],
            "stats has no entry for tensor '/transformer/h.0/ln_1/LayerNormalization_output_0' "
            "(computed for another model?)", s.dir, out.parent / "st")


@pytest.mark.parametrize("damage, needle", [("truncate", "not a readable .npz"),
                                            ("zeros", "not a readable .npz (not a zip archive)")])
def test_inspect_refuses_a_corrupted_stats_file(capsys, work, damage, needle):
    s, stats, _ = work
    raw = stats.read_bytes()
    stats.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else bytes(len(raw)))
    refused(capsys, ["inspect", s.path, "--stats", stats], needle, s.dir, stats.parent)


@pytest.mark.parametrize("alpha", ["-0.1", "nan", "inf"])
def test_quantize_refuses_alpha_outside_the_unit_interval(capsys, work, alpha):
    s, _, out = work
    refused(capsys, ["quantize", s.path, "--data", s.data_path, "--alpha", alpha, "-o", out / "q.onnx"],
            f"alpha must be within [0, 1], got {float(alpha)}", s.dir, out)


def test_calibrate_will_not_write_stats_over_the_model(capsys, tmp_path, synth):
    s = synth("prenorm")
    shutil.copytree(s.dir, tmp_path / "m")
    path = tmp_path / "m" / "model.onnx"
    refused(capsys, ["calibrate", path, "--data", tmp_path / "m" / "data.npz", "-o", path],
            "exists and is not an .npz file; refusing to replace it", tmp_path / "m")


def _writers(s, stats: Path, site: str, dest) -> dict[str, list]:
    """Every command that writes a file, writing `dest(name)`."""
    return {"calibrate": ["calibrate", s.path, "--data", s.data_path, "-o", dest("s.npz")],
            "smooth": ["smooth", s.path, "--stats", stats, "-o", dest("m.onnx")],
            "quantize": ["quantize", s.path, "--data", s.data_path, "-o", dest("q.onnx")],
            "eval": ["eval", s.path, "--reference", s.path, "--data", s.data_path, "--json", dest("e.json")],
            "bench": ["bench", s.path, "--reference", s.path, "--shape", "1x4", "--seconds", "0.05",
                      "--json", dest("b.json")],
            "inspect": ["inspect", s.path, "--stats", stats, "--plot", site, "-o", dest("p.png")]}


@pytest.mark.parametrize("command", ["calibrate", "smooth", "quantize", "eval", "bench", "inspect"])
def test_unwritable_output_folder(capsys, tmp_path, work, command):
    """A folder nobody can create files in, even root: a path under a regular file. Also the
    output named as an existing folder."""
    s, stats, out = work
    (out / "file.txt").write_text("not a folder\n")
    site = analyze(s.model).sites[0].name
    argv = _writers(s, stats, site, lambda name: out / "file.txt" / name)[command]
    refused(capsys, argv, f"{out / 'file.txt'}: is not a folder; cannot write", s.dir, out, stats.parent)
    (out / "taken").mkdir()
    argv = _writers(s, stats, site, lambda name: out / "taken")[command]
    refused(capsys, argv, f"{out / 'taken'}: is a directory; give a file name for the output",
            s.dir, out, stats.parent)


@pytest.mark.skipif(os.geteuid() == 0, reason="root creates files in a chmod 555 folder")
@pytest.mark.parametrize("command", ["calibrate", "smooth", "quantize"])
def test_read_only_output_folder(capsys, tmp_path, work, command):
    s, stats, out = work
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = _writers(s, stats, analyze(s.model).sites[0].name, lambda name: ro / name)[command]
        refused(capsys, argv, f"{ro}: cannot write there (Permission denied)", s.dir, ro)
    finally:
        ro.chmod(0o755)


def test_data_command_unwritable_output(capsys, tmp_path, corpus):
    text, tok = corpus
    (tmp_path / "file.txt").write_text("x")
    refused(capsys, ["data", "--text", text, "--tokenizer", tok, "--seq-len", 8, "--samples", 1,
                     "-o", tmp_path / "file.txt" / "d.npz"], "is not a folder; cannot write d.npz there",
            tmp_path, text.parent)


# ---------------------------------------------------------------------------- corrupted bytes (property)
TINY = SyntheticConfig(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32, vocab=128, max_positions=16,
                       outlier_channels=(3, 9))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small model (mostly graph structure, little weight data), its data and its stats."""
    from graphpass.calibrate.collect import calibrate

    d = tmp_path_factory.mktemp("tiny")
    m = build_prenorm_decoder(TINY)
    path = write_folder(d, m, "causal-lm", random_inputs(m, 2, 8, seed=1))
    calibrate(path, random_inputs(m, 2, 8, seed=1), progress=False).save(d / "stats.npz")
    return d


def _corrupt(raw: bytes, edits: list) -> bytes:
    b = bytearray(raw)
    for op, pos, val in edits:
        k = pos % max(len(b), 1)
        if op == "flip" and b:
            b[k] ^= val or 1
        elif op == "truncate":
            del b[k:]
        elif op == "insert":
            b[k:k] = bytes([val]) * (1 + val % 7)
        elif op == "delete":
            del b[k:k + 1 + val % 7]
    return bytes(b)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete"]),
                           st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)


def _quiet(argv: list) -> tuple[int, str]:
    """The CLI in this process, output captured (hypothesis and function-scoped capsys do not mix)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = invoke(argv)
    return rc, err.getvalue()


def _corrupted_copy(tiny, tmp_path, name: str, edits):
    """(a fresh folder, the file `name` of `tiny` copied into it with `edits` applied)."""
    d = tmp_path / "c"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    bad = d / name
    bad.write_bytes(_corrupt((tiny / name).read_bytes(), edits))
    return d, bad


def _exit_0_or_one_line(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphpass ") and ": error: " in lines[0], err


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=EDITS)
def test_corrupted_model_bytes_never_give_a_traceback(tiny, tmp_path, edits):
    d, bad = _corrupted_copy(tiny, tmp_path, "model.onnx", edits)
    for argv in (["inspect", bad, "--stats", tiny / "stats.npz"],
                 ["calibrate", bad, "--data", tiny / "data.npz", "-o", d / "s.npz"],
                 ["quantize", bad, "--no-smooth", "--scheme", "dynamic", "-o", d / "q.onnx"]):
        _exit_0_or_one_line(*_quiet(argv))
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]   # no temporary file left


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=EDITS)
def test_corrupted_stats_bytes_never_give_a_traceback(tiny, tmp_path, edits):
    d, bad = _corrupted_copy(tiny, tmp_path, "stats.npz", edits)
    for argv in (["inspect", tiny / "model.onnx", "--stats", bad],
                 ["smooth", tiny / "model.onnx", "--stats", bad, "-o", d / "m.onnx"],
                 ["calibrate", "--merge", bad, bad, "-o", d / "merged.npz"]):
        _exit_0_or_one_line(*_quiet(argv))
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]


def _mangle(arrays: dict, op: str, k: int) -> dict:
    """One structural change to the arrays of a stats file (the zip checksum stops byte flips)."""
    keys = sorted(arrays)
    key = keys[k % len(keys)]
    a = arrays[key]
    f = a.dtype.kind == "f"
    make = {"drop": lambda: None, "rename": lambda: a, "2d": lambda: np.stack([a, a]),
            "half": lambda: a[: len(a) // 2] if a.ndim else a,
            "int": lambda: a.astype(np.int64) if f else np.arange(3), "text": lambda: np.array(["abc", "d"]),
            "complex": lambda: a.astype(np.complex64) if f else a,
            "nan": lambda: np.where(np.arange(a.size) == 0, np.nan, a) if f and a.ndim == 1 else a,
            "empty": lambda: np.zeros(0, np.float32), "scalar": lambda: np.float32(3),
            "bool": lambda: np.ones(3, bool),
            "meta": lambda: np.array(['{"samples": -5}', '{"samples": 1e400}', "[]", "{}"][k % 4])}
    with np.errstate(invalid="ignore"):   # NaN -> int64, on purpose
        new = make[op]()
    out = {q: v for q, v in arrays.items() if q != key or op in ("meta",)}
    if op == "rename":
        out[key + "x"] = new
    elif op == "meta":
        out["__graphpass_stats__"] = new
    elif new is not None:
        out[key] = new
    return out


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["drop", "rename", "half", "2d", "int", "text", "complex", "nan",
                                               "empty", "scalar", "bool", "meta"]),
                              st.integers(0, 1000)), min_size=1, max_size=3))
def test_mangled_stats_arrays_never_give_a_traceback(tiny, tmp_path, ops):
    with np.load(tiny / "stats.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for op, k in ops:
        arrays = _mangle(arrays, op, k)
    d = tmp_path / "c"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    np.savez(d / "stats.npz", **arrays)
    for argv in (["inspect", tiny / "model.onnx", "--stats", d / "stats.npz"],
                 ["smooth", tiny / "model.onnx", "--stats", d / "stats.npz", "-o", d / "m.onnx"],
                 ["calibrate", "--merge", d / "stats.npz", tiny / "stats.npz", "-o", d / "merged.npz"]):
        _exit_0_or_one_line(*_quiet(argv))
