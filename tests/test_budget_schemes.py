"""The accuracy budget (search/budget.py) with the schemes and options that landed beside it:
--scheme outlier (without smoothing it still needs statistics; with α auto the searched
thresholds must survive the re-quantization with fixed α) and --kv-cache int8 (every graph the
search writes calibrates its own int8 cache on the calibration part of --data)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import graphpass
from graphpass.calibrate.collect import calibrate
from graphpass.calibrate.data import build_data
from graphpass.errors import GraphpassError
from graphpass.graph.io import save_model
from graphpass.passes.outlier import OutlierConfig
from graphpass.pipeline import PipelineConfig
from graphpass.search.budget import Budget, quantize_within_budget
from graphpass.testing.outliers import build_stubborn_llama
from graphpass.testing.past import build_optimum_past
from graphpass.testing.synthetic import random_inputs

QUIET = dict(progress=False, log=lambda *_: None)
LOOSE = Budget(max_kl=1e9)      # met by the plain graph: one attempt, the plain graph is written


def _past(tmp_path):
    m = build_optimum_past()
    save_model(m, tmp_path / "model.onnx")
    ids = np.random.default_rng(3).integers(0, 256, 12 * 16)
    return tmp_path / "model.onnx", build_data(ids[:8 * 16], 16, 8, m), build_data(ids[8 * 16:], 16, 4, m)


def test_budget_with_kv_cache_writes_an_int8_cache(tmp_path):
    """Regression: the budget's re-quantizations passed no data, so --kv-cache failed after the
    first quantization with 'needs calibration data (--data)' although --data was given (and was
    then refused up front). Now the plain graph gets the calibration samples for its cache."""
    from graphpass.graph.decode import past_layout
    from graphpass.graph.io import load_model

    path, calib, held = _past(tmp_path)
    cfg = PipelineConfig(scheme="token", alpha=None, kv_cache="int8", threads=1)
    res, bres = quantize_within_budget(path, tmp_path / "q.onnx", calib, cfg, LOOSE, held, bench_seconds=0, **QUIET)
    assert bres.met and len(bres.attempts) == 1
    lay = past_layout(load_model(tmp_path / "q.onnx", load_weights=False))
    assert {p.dtype for p in lay.past} == {np.dtype(np.int8)}


def test_budget_with_outlier_and_no_smoothing_calibrates(tmp_path):
    path, calib, held = _past(tmp_path)
    cfg = PipelineConfig(scheme="outlier", alpha=None, threads=1, outlier=OutlierConfig(topk=2))
    res, bres = quantize_within_budget(path, tmp_path / "q.onnx", calib, cfg, LOOSE, held, bench_seconds=0, **QUIET)
    assert bres.met and res.quant.float_share > 0


def test_searched_thresholds_are_kept_when_alpha_is_fixed(tmp_path, monkeypatch):
    """What the budget does after the plain graph: the same stats, α fixed to the searched ones, and
    the searched thresholds passed on; the outlier columns must be the searched graph's (before,
    the re-quantization used the default threshold at every site). Every layer is split here, however
    many of its columns are outliers (else both graphs keep the same float layers)."""
    from graphpass.passes import outlier

    monkeypatch.setattr(outlier, "SPLIT_MAX_SHARE", {False: 1.0, True: 1.0})
    m = build_stubborn_llama()
    save_model(m, tmp_path / "m.onnx")
    data = random_inputs(m, 8, 32, seed=1)
    cfg = PipelineConfig(scheme="outlier", alpha="auto", row_step=1, threads=1,
                         outlier=OutlierConfig(threshold=2.0, slack=1.0))   # sites pick 2, 4, 8 and 16 here
    stats = calibrate(tmp_path / "m.onnx", data, 1, 1, False, row_step=1)
    auto = graphpass.quantize(tmp_path / "m.onnx", tmp_path / "a.onnx", None, cfg, stats=stats, **QUIET)
    assert any(t != cfg.outlier.threshold for t in auto.thresholds.values())   # else the test cannot fail
    fixed = replace(cfg, alpha=0.5, site_alpha=tuple(auto.alphas.items()),
                    outlier_thresholds=tuple(auto.thresholds.items()))
    again = graphpass.quantize(tmp_path / "m.onnx", tmp_path / "b.onnx", None, fixed, stats=stats, **QUIET)
    assert again.quant.columns == auto.quant.columns and again.thresholds == auto.thresholds
    lost = graphpass.quantize(tmp_path / "m.onnx", tmp_path / "c.onnx", None, replace(fixed, outlier_thresholds=()),
                              stats=stats, **QUIET)
    assert lost.quant.columns != auto.quant.columns          # what the budget wrote before: other columns
