"""Calibration of with-past graphs covers decode steps against the real cache.

Each window x_r = ids[rS:(r+1)S] runs as a prefill, then K one-token steps fed the text that
follows it (the next window's first K tokens). In exact arithmetic a step's activations equal
those of a prefill over the longer window ids[rS:(r+1)S+K] at that position, so the ranges
with K steps equal the ranges of prefills over the extended windows up to float32 rounding
(relative 1e-4 here: activations are O(1..100), rounding differences O(1e-6)); a wrong cache,
mask or position moves them by O(1)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphpass.calibrate.collect import calibrate, run_window, with_next_tokens
from graphpass.calibrate.data import batches, build_data
from graphpass.graph.decode import past_layout
from graphpass.graph.runtime import make_session
from graphpass.testing.past import build_genai_past, build_optimum_past
from graphpass.testing.synthetic import SyntheticConfig

CFG = SyntheticConfig()
S, N, K = 12, 4, 5
RTOL = 1e-4


@pytest.fixture(scope="module", params=["optimum", "genai"])
def saved(request, tmp_path_factory):
    build = build_optimum_past if request.param == "optimum" else build_genai_past
    d = tmp_path_factory.mktemp(request.param)
    model = build(CFG)
    onnx.save(model, d / "model.onnx")
    ids = np.random.default_rng(3).integers(0, CFG.vocab, N * S)
    return d / "model.onnx", model, build_data(ids, S, N, model), ids


def _close(a, b) -> bool:
    return all(np.allclose(a.min[t], b.min[t], rtol=RTOL, atol=RTOL * np.abs(b.min[t]).max())
               and np.allclose(a.max[t], b.max[t], rtol=RTOL, atol=RTOL * np.abs(b.max[t]).max())
               for t in b.min)


def _calib(path, data, k, batch_size=2, **kw):
    return calibrate(path, data, batch_size=batch_size, threads=1, progress=False, decode_steps=k, **kw)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_decode_steps_reach_the_ranges_of_prefills_over_the_following_text(saved, batch_size):
    path, model, data, ids = saved
    stepped = _calib(path, data, K, batch_size)
    longer = build_data(np.concatenate([ids[r * S:(r + 1) * S + K] for r in range(N - 1)]),
                        S + K, N - 1, model)
    last = {k: v[-1:] for k, v in data.items()}
    want = _calib(path, longer, 0).merge(_calib(path, last, 0))
    assert set(stepped.min) == set(want.min) and stepped.samples == N
    assert _close(stepped, want)


def test_decode_steps_widen_the_prefill_ranges(saved):
    path, _, data, _ = saved
    plain, stepped = _calib(path, data, 0), _calib(path, data, K)
    assert any((stepped.max[t] > plain.max[t] + 1e-6).any() or (stepped.min[t] < plain.min[t] - 1e-6).any()
               for t in plain.max), "the K decode steps widened no range"
    assert all((stepped.max[t] >= plain.max[t]).all() and (stepped.min[t] <= plain.min[t]).all()
               for t in plain.max)


def test_run_window_runs_one_prefill_then_k_one_token_steps(saved):
    path, model, data, ids = saved
    layout = past_layout(model)
    sess = make_session(model, 1)
    pairs = list(with_next_tokens(batches(data, 2), K))
    assert [None if f is None else f.shape for _, f in pairs] == [(2, K), (1, K)]
    np.testing.assert_array_equal(pairs[0][1], [ids[S:S + K], ids[2 * S:2 * S + K]])
    seen = []
    runs = list(run_window(sess, ["logits"], pairs[0][0], layout, pairs[0][1],
                           lambda f: seen.append(f) or {}))
    assert [r[0].shape[:2] for r in runs] == [(2, S)] + [(2, 1)] * K
    assert [f["attention_mask"].shape[1] for f in seen] == list(range(S, S + K + 1))
    full = sess.run(["logits"], build_data(ids[:2 * S + 2 * K][np.r_[0:S + K, S:2 * S + K]], S + K, 2,
                                           model))[0]
    np.testing.assert_allclose(np.concatenate([r[0] for r in runs], 1), full, atol=1e-4)
    assert len(list(run_window(sess, ["logits"], pairs[1][0], layout, None, lambda f: {}))) == 1


def test_row_samples_come_from_every_run(saved):
    path, _, data, _ = saved
    st = _calib(path, data, K, batch_size=N, row_step=1)
    t = next(iter(st.rows))
    assert st.rows[t].shape[0] == N * S + (N - 1) * K   # row_step 1: every row of every run


def test_cli_decode_steps(capsys, saved, tmp_path):
    from conftest import cli_error, cli_ok
    from graphpass.calibrate.stats import Stats

    path, _, data, _ = saved
    np.savez(tmp_path / "d.npz", **data)
    for k in (0, K):
        cli_ok(capsys, ["calibrate", path, "--data", tmp_path / "d.npz", "--threads", 1,
                        "--decode-steps", k, "-o", tmp_path / f"s{k}.npz"])
        assert _close(Stats.load(tmp_path / f"s{k}.npz"), _calib(path, data, k, batch_size=1))
    assert not _close(Stats.load(tmp_path / f"s{K}.npz"), Stats.load(tmp_path / "s0.npz"))
    assert "--decode-steps must be >= 0, got -1" in cli_error(
        capsys, ["calibrate", path, "--data", tmp_path / "d.npz", "--decode-steps", -1, "-o", tmp_path / "x.npz"])
    assert "--decode-steps must be >= 0, got -2" in cli_error(
        capsys, ["quantize", path, "--data", tmp_path / "d.npz", "--decode-steps", -2, "-o", tmp_path / "q.onnx"])


@pytest.mark.parametrize("row_step", [0, 3])
def test_windows_in_flight_give_the_stats_of_one_at_a_time_to_the_bit(saved, row_step):
    path, _, data, _ = saved
    one = ({}, {})     # the KV-cache statistic, gathered in the same runs from two threads
    a, b = (_calib(path, data, K, batch_size=1, row_step=row_step, cache=c, windows=w)
            for c, w in ((one[0], 1), (one[1], 2)))
    assert a.samples == b.samples == N and set(a.min) == set(b.min) and set(a.rows) == set(b.rows)
    for t in a.min:
        for f in ("min", "max", "abs_sum", "rows"):
            if t in getattr(a, f):
                np.testing.assert_array_equal(getattr(a, f)[t], getattr(b, f)[t], err_msg=f"{f} of {t}")
        assert a.count[t] == b.count[t]
    assert one[0].keys() == one[1].keys() and one[0]
    for k in one[0]:
        np.testing.assert_array_equal(one[0][k], one[1][k])


@pytest.mark.parametrize("threads, windows, per_run", [(2, None, 1), (2, 1, 2), (1, None, 1), (4, None, 2)])
def test_windows_in_flight_share_the_threads(saved, monkeypatch, threads, windows, per_run):
    """Two windows in flight on one session each run on threads // 2 intra-op threads (each
    run with a pool of both threads made them wait on each other: 35 s against 28 s on SmolLM2)."""
    import graphpass.calibrate.collect as collect

    made, real = [], collect.make_session
    monkeypatch.setattr(collect, "make_session", lambda src, n, **kw: made.append(n) or real(src, n, **kw))
    path, _, data, _ = saved
    collect.calibrate(path, data, 1, threads, False, decode_steps=0, windows=windows)
    assert made == [per_run]


def test_calibration_on_the_fused_graph_reads_the_same_inputs(tmp_path):
    """With --decode-fusions the pipeline calibrates the graph after the attention and norm
    fusions: fewer nodes, the same linear inputs, stats equal up to float rounding (RTOL). A
    rewrite that loses a linear input is refused on one line."""
    from decode_tiny import tiny_decoder
    from graphpass.errors import GraphpassError
    from graphpass.pipeline import PipelineConfig, _calibration_fusions

    model = tiny_decoder()
    onnx.save(model, tmp_path / "m.onnx")
    data = build_data(np.random.default_rng(5).integers(0, 64, N * S), S, N, model)
    fuse = _calibration_fusions(PipelineConfig(scheme="token", decode_fusions=True))
    seen = []
    fused = _calib(tmp_path / "m.onnx", data, K, batch_size=1, row_step=3,
                   rewrite=lambda g: seen.append((len(g.nodes), fuse(g), len(g.nodes))))
    plain = _calib(tmp_path / "m.onnx", data, K, batch_size=1, row_step=3)
    assert seen and seen[0][1].attention == 2 and seen[0][2] < seen[0][0]
    assert set(fused.min) == set(plain.min) and _close(fused, plain)
    for t in plain.rows:
        np.testing.assert_allclose(fused.rows[t], plain.rows[t], rtol=RTOL, atol=RTOL * np.abs(plain.rows[t]).max())
    assert _calibration_fusions(PipelineConfig(scheme="token")) is None
    assert _calibration_fusions(PipelineConfig(scheme="token", decode_fusions=True, batch_size=2)) is None

    def lose(g):
        lin = next(n for n in g.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
        lin.inputs[0].name = "renamed"
    with pytest.raises(GraphpassError, match="no longer has the linear input"):
        _calib(tmp_path / "m.onnx", data, K, rewrite=lose)
