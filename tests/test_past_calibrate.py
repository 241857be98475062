"""Calibration of with-past graphs covers decode steps against the real cache.

A window x[0:S] runs as a prefill of S-K tokens and K one-token steps. In exact arithmetic each
step's activations equal the full prefill's at that position, so the ranges with K steps equal
the ranges of one full prefill up to float32 rounding (relative 1e-4 here: activations are
O(1..100), rounding differences O(1e-6)); a wrong cache, mask or position moves them by O(1)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphpass.calibrate.collect import calibrate, run_window
from graphpass.calibrate.data import build_data
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
    return d / "model.onnx", model, build_data(ids, S, N, model)


def _close(a, b) -> bool:
    return all(np.allclose(a.min[t], b.min[t], rtol=RTOL, atol=RTOL * np.abs(b.min[t]).max())
               and np.allclose(a.max[t], b.max[t], rtol=RTOL, atol=RTOL * np.abs(b.max[t]).max())
               for t in b.min)


def test_decode_steps_reach_the_ranges_of_a_full_prefill(saved):
    path, _, data = saved
    full = calibrate(path, data, batch_size=2, threads=1, progress=False, decode_steps=0)
    stepped = calibrate(path, data, batch_size=2, threads=1, progress=False, decode_steps=K)
    assert set(stepped.min) == set(full.min) and stepped.samples == full.samples == N
    assert _close(stepped, full)


def test_decode_steps_add_what_the_prefill_part_alone_misses(saved):
    path, model, data = saved
    head = build_data(data["input_ids"].reshape(-1)[: N * S], S, N, model)
    head = {k: (v[:, :S - K] if k in ("input_ids", "attention_mask", "position_ids") else v)
            for k, v in head.items()}
    part = calibrate(path, head, batch_size=2, threads=1, progress=False, decode_steps=0)
    stepped = calibrate(path, data, batch_size=2, threads=1, progress=False, decode_steps=K)
    wider = [t for t in part.max if (stepped.max[t] > part.max[t] + 1e-6).any()]
    assert wider, "the K decode steps widened no range"
    assert all((stepped.max[t] >= part.max[t] - 1e-5 * np.abs(part.max[t]).max()).all() for t in part.max)


def test_run_window_runs_one_prefill_then_k_one_token_steps(saved):
    path, model, data = saved
    layout = past_layout(model)
    sess = make_session(model, 1)
    batch = {k: v[:2] for k, v in data.items()}
    seen = []
    runs = list(run_window(sess, ["logits"], batch, layout, K, lambda f: seen.append(f) or {}))
    assert [r[0].shape[1] for r in runs] == [S - K] + [1] * K
    assert [f["attention_mask"].shape[1] for f in seen] == list(range(S - K, S + 1))
    full = sess.run(["logits"], batch)[0]
    np.testing.assert_allclose(np.concatenate([r[0] for r in runs], 1), full, atol=1e-4)
    assert len(list(run_window(sess, ["logits"], batch, layout, 0, lambda f: {}))) == 1
    assert len(list(run_window(sess, ["logits"], batch, layout, 99, lambda f: {}))) == S   # K <= S-1


def test_row_samples_come_from_every_run(saved):
    path, _, data = saved
    st = calibrate(path, data, batch_size=N, threads=1, progress=False, decode_steps=K, row_step=1)
    t = next(iter(st.rows))
    assert st.rows[t].shape[0] == N * S   # row_step 1: every row of the prefill and of each step


def test_cli_decode_steps(capsys, saved, tmp_path):
    from conftest import cli_error, cli_ok
    from graphpass.calibrate.stats import Stats

    path, _, data = saved
    np.savez(tmp_path / "d.npz", **data)
    for k in (0, K):
        cli_ok(capsys, ["calibrate", path, "--data", tmp_path / "d.npz", "--threads", 1,
                        "--decode-steps", k, "-o", tmp_path / f"s{k}.npz"])
    a, b = Stats.load(tmp_path / "s0.npz"), Stats.load(tmp_path / f"s{K}.npz")
    assert _close(b, a)
    assert "--decode-steps must be >= 0, got -1" in cli_error(
        capsys, ["calibrate", path, "--data", tmp_path / "d.npz", "--decode-steps", -1, "-o", tmp_path / "x.npz"])
    assert "--decode-steps must be >= 0, got -2" in cli_error(
        capsys, ["quantize", path, "--data", tmp_path / "d.npz", "--decode-steps", -2, "-o", tmp_path / "q.onnx"])
