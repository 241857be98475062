"""Streaming calibration (graphpass.calibrate.collect) and stats files (graphpass.calibrate.stats)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import cli_error, cli_ok, copy_model, make_model, node, run, write_folder
from graphpass.calibrate.collect import add_reductions, calibrate, calibration_targets
from graphpass.errors import GraphpassError
from graphpass.graph.io import save_model
from graphpass.match.sites import analyze
from graphpass.calibrate.stats import META_KEY, Stats

STATS_RTOL = 1e-6  # |stats - numpy| / max|x| per tensor: onnxruntime may fuse differently per graph


def _assert_stats_close(a: Stats, b: Stats, rtol: float = STATS_RTOL) -> None:
    assert a.min.keys() == b.min.keys() and a.max.keys() == b.max.keys()
    for t in a.min:
        scale = max(np.abs(a.min[t]).max(), np.abs(a.max[t]).max())
        assert np.abs(a.min[t] - b.min[t]).max() <= rtol * scale, t
        assert np.abs(a.max[t] - b.max[t]).max() <= rtol * scale, t


def _assert_stats_equal(a: Stats, b: Stats) -> None:
    assert a.samples == b.samples and a.min.keys() == b.min.keys()
    for t in a.min:
        np.testing.assert_array_equal(a.min[t], b.min[t])
        np.testing.assert_array_equal(a.max[t], b.max[t])


def _half(data, k):
    n = next(iter(data.values())).shape[0] // 2
    return {name: v[k * n:(k + 1) * n] for name, v in data.items()}


# ---------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("variant", ["prenorm", "llama", "postln-gemm"])
def test_stats_equal_numpy_over_all_axes_but_the_last(synth, calibrated, variant):
    s = synth(variant)
    targets = calibration_targets(s.model)
    assert set(targets) == {lin.act for lin in analyze(s.model).linears}
    acts = run(s.model, s.data, list(targets))
    stats = calibrated(variant)
    assert set(stats.min) == set(targets) and stats.samples == len(s.data["input_ids"])
    want = Stats(samples=stats.samples)
    for t, width in targets.items():
        x = acts[t].reshape(-1, acts[t].shape[-1])
        assert x.shape[1] == width
        want.update(t, x.min(0), x.max(0))
    _assert_stats_close(stats, want)


def test_batch_size_does_not_change_stats(synth):
    s = synth("llama")
    one = calibrate(s.path, s.data, batch_size=1, progress=False)
    four = calibrate(s.path, s.data, batch_size=4, progress=False)
    three = calibrate(s.path, s.data, batch_size=3, progress=False)  # ragged last batch
    assert one.samples == four.samples == three.samples == 4
    _assert_stats_close(one, four)
    _assert_stats_close(one, three)


def test_merged_shards_equal_calibrating_all_data(synth):
    s = synth("postln")
    whole = calibrate(s.path, s.data, batch_size=1, progress=False)
    a = calibrate(s.path, _half(s.data, 0), batch_size=1, progress=False)
    b = calibrate(s.path, _half(s.data, 1), batch_size=1, progress=False)
    _assert_stats_equal(a.merge(b), whole)
    assert not all(np.array_equal(a.max[t], whole.max[t]) for t in a.max)  # the halves differ


def test_external_data_model_calibrates_the_same(synth, calibrated, tmp_path):
    s = synth("prenorm")
    save_model(s.model, tmp_path / "model.onnx", external=True)
    stats = calibrate(tmp_path / "model.onnx", s.data, batch_size=2, progress=False)
    _assert_stats_equal(stats, calibrated("prenorm"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_calibration_graph_drops_the_lm_head(synth):
    for variant in ("prenorm", "llama"):
        m = copy_model(synth(variant).model)
        targets = sorted(calibration_targets(m))
        outs = add_reductions(m, targets)
        assert len(outs) == 4 * len(targets) == len(m.graph.output)   # min, max, Σ|x|, shape
        assert [o.name for o in m.graph.output] == outs
        names = {n.name for n in m.graph.node}
        assert not any(n.startswith("/lm_head") for n in names), variant
        readers = {i for n in m.graph.node for i in n.input}
        assert all(t.name in readers for t in m.graph.initializer)  # unread weights pruned
    assert "lm_head" in {n.name.split("/")[1] for n in synth("llama").model.graph.node}


def test_each_linear_input_is_reduced_as_soon_as_it_exists(synth, tmp_path):
    """The reductions sit right behind the node that makes their input, and a session in node
    order runs them there (onnxruntime's default order ran them all after the last layer, with
    every linear input alive until then)."""
    import json
    from pathlib import Path

    from graphpass.graph.runtime import make_session

    m = copy_model(synth("llama").model)
    targets = sorted(calibration_targets(m))
    add_reductions(m, targets, gram_step=4)
    order = [n.name for n in m.graph.node]
    made = {o: i for i, n in enumerate(m.graph.node) for o in n.output}
    for k, t in enumerate(targets):
        assert order.index(f"gp_calib_Flatten_{k}") == made[t] + 1, t
        # GPTQ's rows too (they were sliced after the last layer, every input alive until then)
        assert made[t] < order.index(f"gp_calib_GramSlice_{k}") <= made[t] + 8, t
    sess = make_session(m, 1, in_order=True, profile=True)
    data = np.load(synth("llama").dir / "data.npz")
    sess.run(None, {i.name: data[i.name][:1] for i in sess.get_inputs()})
    prof = Path(sess.end_profiling())
    ran = [e["name"] for e in json.loads(prof.read_text()) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    prof.unlink()
    first = min(i for i, n in enumerate(ran) if n.startswith("gp_calib_Reduce"))
    assert first < len(ran) // 4, f"the first reduction ran as node {first} of {len(ran)}"


def test_model_without_linear_layers(tmp_path):
    m = make_model([node("Relu", ["x"], "y")], [("x", ["n", 4])], [("y", ["n", 4])], {})
    path = write_folder(tmp_path / "m", m, "encoder")
    with pytest.raises(GraphpassError, match="no linear layer with a constant weight"):
        calibrate(path, {"x": np.ones((2, 4), np.float32)}, progress=False)


# ---------------------------------------------------------------------------- stats files
def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    st = Stats(samples=7)
    for t in ("/a/b_output_0", "odd::name", "x"):
        lo = rng.standard_normal(5).astype(np.float32)
        st.update(t, lo, lo + 1)
    st.save(tmp_path / "s.npz")
    _assert_stats_equal(Stats.load(tmp_path / "s.npz"), st)


def test_merge_refuses_stats_of_different_models(calibrated):
    with pytest.raises(GraphpassError, match="cover different tensors"):
        calibrated("prenorm").merge(calibrated("llama"))
    a = calibrated("prenorm")
    b = Stats({t: v[:3] for t, v in a.min.items()}, {t: v[:3] for t, v in a.max.items()}, 1)
    with pytest.raises(GraphpassError, match="disagree on the channels of"):
        a.merge(b)


def test_calibrate_cli_shards_and_merge(capsys, synth, tmp_path):
    s = synth("llama")
    for k in (0, 1):
        np.savez(tmp_path / f"d{k}.npz", **_half(s.data, k))
        out, _ = cli_ok(capsys, ["calibrate", s.path, "--data", tmp_path / f"d{k}.npz",
                                 "--batch-size", 2, "-o", tmp_path / f"s{k}.npz"])
        assert out.startswith(f"wrote {tmp_path / f's{k}.npz'}: 9 tensors, 2 samples")  # 4 per layer + the head
    out, _ = cli_ok(capsys, ["calibrate", "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz",
                             "-o", tmp_path / "all.npz"])
    assert "4 samples" in out
    whole = calibrate(s.path, s.data, batch_size=2, progress=False)
    _assert_stats_equal(Stats.load(tmp_path / "all.npz"), whole)


def test_batches_from_a_reader_or_an_iterable_give_the_same_stats(synth, calibrated):
    s = synth("prenorm")
    chunks = [{k: v[i:i + 2] for k, v in s.data.items()} for i in (0, 2)]

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(chunks)

        def get_next(self):
            return next(self.it, None)

    _assert_stats_equal(calibrate(s.path, chunks, progress=False), calibrated("prenorm"))
    _assert_stats_equal(calibrate(s.path, Reader(), progress=False), calibrated("prenorm"))
    with pytest.raises(GraphpassError, match="gave no batch"):
        calibrate(s.path, [], progress=False)
    with pytest.raises(GraphpassError, match="not graph inputs"):
        calibrate(s.path, synth("postln").data, progress=False)


def test_calibrate_cli_refuses_data_of_another_model(capsys, synth, tmp_path):
    out = tmp_path / "s.npz"
    msg = cli_error(capsys, ["calibrate", synth("prenorm").path, "--data", synth("postln").data_path,
                             "-o", out], [out])
    assert "not graph inputs" in msg


# ---------------------------------------------------------------------------- corrupted stats
def _corrupt(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "garbage":
        return np.random.default_rng(0).bytes(len(good))
    if kind == "zeros":
        return bytes(len(good))
    raise ValueError(kind)


def _rewrite(path, arrays: dict) -> None:
    np.savez(path, **arrays)


@pytest.mark.parametrize("kind, needle", [
    ("truncated", "not a readable .npz"),
    ("garbage", "s.npz"),
    ("zeros", "s.npz"),
    ("no-meta", "not a graphpass stats file"),
    ("unpaired", "corrupted stats file"),
    ("bad-key", "not a graphpass stats file"),
    ("data-file", "not a graphpass stats file"),
])
def test_corrupted_stats_file_is_one_line(capsys, synth, calibrated, tmp_path, kind, needle):
    p = tmp_path / "s.npz"
    calibrated("prenorm").save(p)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    if kind in ("truncated", "garbage", "zeros"):
        p.write_bytes(_corrupt(kind, p.read_bytes()))
    elif kind == "no-meta":
        _rewrite(p, {k: v for k, v in arrays.items() if k != META_KEY})
    elif kind == "unpaired":
        _rewrite(p, {k: v for k, v in arrays.items() if not k.endswith("ln_f/LayerNormalization_output_0::max")})
    elif kind == "bad-key":
        _rewrite(p, {**arrays, "x::mean": np.zeros(3, np.float32)})
    else:
        _rewrite(p, {META_KEY: arrays[META_KEY], "input_ids": np.zeros((2, 3), np.int64)})
    out = tmp_path / "o.onnx"
    msg = cli_error(capsys, ["smooth", synth("prenorm").path, "--stats", p, "-o", out], [out])
    assert needle in msg
    assert needle in cli_error(capsys, ["calibrate", "--merge", p, p, "-o", tmp_path / "m.npz"],
                               [tmp_path / "m.npz"])


def _patch_zip(raw: bytes, fields) -> bytes:
    """Set little-endian 2-byte fields (signature, offset, value) in every zip header of `raw`."""
    b = bytearray(raw)
    for sig, off, val in fields:
        i = b.find(sig)
        while i >= 0:
            b[i + off:i + off + 2] = val.to_bytes(2, "little")
            i = b.find(sig, i + 4)
    return bytes(b)


CENTRAL, LOCAL = b"PK\x01\x02", b"PK\x03\x04"


@pytest.mark.parametrize("fields", [
    [(CENTRAL, 10, 99), (LOCAL, 8, 99)],  # compression method 99
    [(CENTRAL, 6, 99)],  # 'needs zip version 9.9'
    [(CENTRAL, 8, 1), (LOCAL, 6, 1)],  # encrypted flag
], ids=["method", "version", "encrypted"])
def test_damaged_zip_header_is_one_line(capsys, synth, calibrated, tmp_path, fields):
    p = tmp_path / "s.npz"
    calibrated("prenorm").save(p)
    p.write_bytes(_patch_zip(p.read_bytes(), fields))
    cli_error(capsys, ["calibrate", "--merge", p, p, "-o", tmp_path / "m.npz"], [tmp_path / "m.npz"])


# ---------------------------------------------------------------------------- mean|x| (AWQ)
def test_mean_abs_is_numpys_over_every_row_and_merges_and_saves(tmp_path):
    """A linear layer reads the graph input: calibration's mean|x_j| is numpy's over every row of
    every batch (batches of different sizes weigh by their rows), shards merge, files keep it."""
    rng = np.random.default_rng(0)
    m = make_model([node("MatMul", ["x", "W"], "y")], [("x", ["b", "s", 8])], [("y", ["b", "s", 3])],
                   {"W": rng.normal(size=(8, 3)).astype(np.float32)})
    save_model(m, tmp_path / "m.onnx")
    x = rng.normal(size=(5, 6, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    st = calibrate(tmp_path / "m.onnx", {"x": x}, batch_size=2, progress=False)   # batches of 2, 2, 1
    want = np.abs(x).reshape(-1, 8).mean(0)
    np.testing.assert_allclose(st.mean_abs("x"), want, rtol=1e-5)
    a = calibrate(tmp_path / "m.onnx", {"x": x[:1]}, progress=False)
    b = calibrate(tmp_path / "m.onnx", {"x": x[1:]}, progress=False)
    np.testing.assert_allclose(a.merge(b).mean_abs("x"), want, rtol=1e-5)
    st.save(tmp_path / "s.npz")
    np.testing.assert_allclose(Stats.load(tmp_path / "s.npz").mean_abs("x"), want, rtol=1e-5)
    with pytest.raises(GraphpassError, match="no mean"):
        Stats().mean_abs("x")


def test_merge_keeps_mean_abs_only_where_both_shards_have_it():
    a, b = Stats(samples=1), Stats(samples=1)
    for st in (a, b):
        st.update("x", np.zeros(3, np.float32), np.ones(3, np.float32))
    a.add_abs("x", np.ones(3), 4)
    with pytest.raises(GraphpassError, match="no mean"):
        a.merge(b).mean_abs("x")          # an older shard without it: no mean over part of the rows
    b.add_abs("x", 3 * np.ones(3), 4)
    np.testing.assert_allclose(a.merge(b).mean_abs("x"), 0.5)
