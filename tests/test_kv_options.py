"""--kv-cache int8 options: --kv-no-fold where attention is GroupQueryAttention (a one-line error),
--decode-steps as given (0: prefill windows only), and how often the calibration data is read."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import cli_error, cli_ok, write_folder

from graphpass.calibrate.data import build_data, load_data
from graphpass.calibrate.kv import cache_absmax, cache_scales
from graphpass.errors import GraphpassError
from graphpass.graph.gs_io import import_graph
from graphpass.passes.kv_cache import cache_multipliers
from graphpass.testing.past import PAST_BUILDS, token_ids
from graphpass.testing.synthetic import SyntheticConfig

CFG = SyntheticConfig()
LEN = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for form, build in PAST_BUILDS.items():
        d = tmp_path_factory.mktemp(f"kvopt_{form}")
        m = build(CFG)
        ids = token_ids(CFG, 8 * LEN)
        out[form] = write_folder(d / "src", m, "causal-lm", build_data(ids, LEN, 8, m))
    return out


def _scales(path) -> dict[str, np.ndarray]:
    """The scales s [kv, d] the int8-cache graph at `path` stores."""
    return {k: (1.0 / m).reshape(m.shape[1], m.shape[3]) for k, m in
            cache_multipliers(import_graph(onnx.load(str(path)))).items()}


def test_kv_no_fold_with_group_query_attention_is_one_line_up_front(folders, tmp_path, capsys):
    """Regression: --kv-no-fold was accepted and silently did nothing where the graph has
    GroupQueryAttention (the kernel reads the int8 cache with its scales itself)."""
    from graphpass.pipeline import PipelineConfig

    src = folders["genai"]
    out = tmp_path / "x.onnx"
    err = cli_error(capsys, ["quantize", src, "-o", out, "--scheme", "none", "--no-smooth", "--kv-cache", "int8",
                             "--kv-no-fold", "--data", src.parent / "data.npz"], absent=[out])
    assert "--kv-no-fold has no effect on GroupQueryAttention" in err
    with pytest.raises(GraphpassError, match="--decode-fusions makes it"):
        PipelineConfig(scheme="token", kv_cache="int8", kv_fold=False, decode_fusions=True)
    PipelineConfig(scheme="token", kv_cache="int8", kv_fold=False)          # decomposed: it applies


def test_kv_cache_calibration_takes_decode_steps_as_given(folders, tmp_path, capsys):
    """Regression: the cache was calibrated with max(--decode-steps, 1) decode steps. With 0 the
    stored scales are those of the prefill windows alone (the cache entry of a slot is the same
    function of the tokens before it in a prefill as in a decode step)."""
    src = folders["optimum"]
    data = load_data(src.parent / "data.npz")
    out = tmp_path / "p.onnx"
    o, _ = cli_ok(capsys, ["quantize", src, "-o", out, "--scheme", "none", "--no-smooth", "--kv-cache", "int8",
                           "--decode-steps", 0, "--data", src.parent / "data.npz"])
    assert "over prefill windows only (--decode-steps 0)" in o
    got = _scales(out)
    want0 = cache_scales(cache_absmax(src, data, 0, progress=False))
    want1 = cache_scales(cache_absmax(src, data, 1, progress=False))
    assert any(not np.allclose(want0[k], want1[k], rtol=1e-4) for k in want0)      # the test can tell
    for k, s in want0.items():
        np.testing.assert_allclose(got[k], s, rtol=1e-5, err_msg=k)


@pytest.fixture
def reads(monkeypatch):
    """How many passes over the calibration data (dict) were made, by whom."""
    import graphpass.calibrate.collect as collect
    import graphpass.calibrate.kv as kv

    seen: list[str] = []
    real = collect.feeds

    def counted(who):
        def feeds(data, *a, **k):
            seen.append(who)
            return real(data, *a, **k)
        return feeds
    monkeypatch.setattr(collect, "feeds", counted("calibrate"))
    monkeypatch.setattr(kv, "feeds", counted("cache"))
    return seen


def test_kv_smooth_with_smoothquant_reads_the_data_twice(folders, tmp_path, reads, capsys):
    """Regression: calibration, the key statistic for σ and the written graph's cache each read
    the data (3 passes). The key statistic now comes from the calibration runs."""
    src = folders["optimum"]
    cli_ok(capsys, ["quantize", src, "-o", tmp_path / "s.onnx", "--scheme", "token", "--alpha", "0.5",
                    "--kv-cache", "int8", "--kv-smooth", "1", "--data", src.parent / "data.npz"])
    assert reads == ["calibrate", "cache"]


def test_kv_smooth_alone_reads_the_data_once_and_gets_the_same_scales(folders, tmp_path, reads, capsys):
    """--scheme none --no-smooth --kv-smooth: the written graph differs from the source only by σ
    in the q / k weights, so its cache statistic is the source's with keys divided by σ; one
    pass. The scales equal those measured on the smoothed float graph."""
    from graphpass.passes.kv_smooth import key_factors, smooth_keys

    src = folders["optimum"]
    data = load_data(src.parent / "data.npz")
    out = tmp_path / "k.onnx"
    o, _ = cli_ok(capsys, ["quantize", src, "-o", out, "--scheme", "none", "--no-smooth", "--kv-cache", "int8",
                           "--kv-scales", "head", "--kv-smooth", "1", "--data", src.parent / "data.npz"])
    assert reads == ["cache"] and "scales from the key smoothing's pass" in o
    reads.clear()
    g = import_graph(onnx.load(str(src)))
    smooth_keys(g, key_factors(cache_absmax(src, data, 4, progress=False), 1.0))
    import onnx_graphsurgeon as gs
    onnx.save(gs.export_onnx(g), tmp_path / "smoothed.onnx")
    want = cache_scales(cache_absmax(tmp_path / "smoothed.onnx", data, 4, progress=False), "head")
    got = _scales(out)
    for k, s in want.items():
        np.testing.assert_allclose(got[k], s, rtol=1e-5, err_msg=k)
