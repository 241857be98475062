"""A Llama where smoothing alone leaves large outliers: the fixture of the outlier scheme.

build_llama (testing/synthetic.py) with two channels S = 300 times the typical activation at
every linear-layer input. SmoothQuant migrates a factor s_j = a_j^α / w_j^(1-α) from X to W,
so with both sides quantized one of them keeps an outlier ~ S^min(α, 1-α) against its
median, whichever α the search picks (measured: max/median after smoothing ≥ 5.9 on activations
or weights, from 300 before); per-token int8 of the rest of a row then spends its 8 bits on the
outlier. The outlier scheme computes those two columns in float and quantizes what is left.
"""
from __future__ import annotations

import onnx

from graphpass.testing.synthetic import SyntheticConfig, build_llama

STUBBORN = SyntheticConfig(outlier_channels=(3, 17), outlier_scale=300.0)


def build_stubborn_llama(cfg: SyntheticConfig = STUBBORN) -> onnx.ModelProto:
    return build_llama(cfg)
