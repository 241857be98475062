"""The tiny with-past decoders: a cached decode equals recomputing the whole sequence.

Tolerance: logits are O(10); float32 attention over <= 12 positions in another order differs
by a few 1e-6, so 1e-4 absolute is two orders of magnitude of margin and still catches any
wrong position, mask or cache slot (those move logits by O(1))."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphpass.testing.past import build_genai_past, build_optimum_past, empty_past
from graphpass.testing.synthetic import SyntheticConfig

ATOL = 1e-4
CFG = SyntheticConfig(layers=2, heads=4, kv_heads=2)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(sess, model, ids, mask, past=None, positions=None):
    """One step; optimum takes position_ids = (running count of mask ones) - 1 for the new tokens."""
    names = [i.name for i in sess.get_inputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, **(past or empty_past(model, len(ids)))}
    if "position_ids" in names:
        feeds["position_ids"] = (np.cumsum(mask, 1) - 1).clip(0)[:, -ids.shape[1]:]
    outs = sess.run(None, feeds)
    present = {f"past_key_values.{o.name[len('present.'):]}": v
               for o, v in zip(sess.get_outputs(), outs) if o.name.startswith("present.")}
    return outs[0], present


@pytest.mark.parametrize("build", [build_optimum_past, build_genai_past])
@pytest.mark.parametrize("prefix", [1, 4])
def test_prefill_then_decode_equals_full_prefill(build, prefix):
    model = build(CFG)
    sess = _session(model)
    ids = np.random.default_rng(1).integers(0, CFG.vocab, (2, 9))
    full, present = _run(sess, model, ids, np.ones_like(ids))
    assert present["past_key_values.0.key"].shape == (2, CFG.kv_heads, 9, CFG.head_dim)
    logits, past = _run(sess, model, ids[:, :prefix], np.ones((2, prefix), np.int64))
    np.testing.assert_allclose(logits, full[:, :prefix], atol=ATOL)
    for t in range(prefix, ids.shape[1]):
        logits, past = _run(sess, model, ids[:, t:t + 1], np.ones((2, t + 1), np.int64), past)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL)
    assert past["past_key_values.1.value"].shape[2] == ids.shape[1]
    np.testing.assert_allclose(past["past_key_values.1.value"], present["past_key_values.1.value"],
                               atol=ATOL)


def test_chunked_prefill_against_a_nonempty_past():
    """Several new tokens at once over a past of length 5 (query t sees all past keys and its own
    causal part)."""
    model = build_optimum_past(CFG)
    sess = _session(model)
    ids = np.random.default_rng(2).integers(0, CFG.vocab, (1, 9))
    full, _ = _run(sess, model, ids, np.ones_like(ids))
    _, past = _run(sess, model, ids[:, :5], np.ones((1, 5), np.int64))
    logits, _ = _run(sess, model, ids[:, 5:], np.ones((1, 9), np.int64), past)
    np.testing.assert_allclose(logits, full[:, 5:], atol=ATOL)


def test_optimum_batch_with_left_padding():
    """Rows of different lengths, left-padded through attention_mask: each row's logits equal its
    own unpadded run, in prefill and in every decode step."""
    model = build_optimum_past(CFG)
    sess = _session(model)
    ids = np.random.default_rng(3).integers(0, CFG.vocab, (2, 8))
    lengths, prompt = (6, 3), 6
    mask = np.zeros((2, prompt), np.int64)
    batch_ids = np.zeros((2, prompt), np.int64)
    for r, n in enumerate(lengths):
        mask[r, prompt - n:], batch_ids[r, prompt - n:] = 1, ids[r, :n]
    logits, past = _run(sess, model, batch_ids, mask)
    alone = [_run(sess, model, ids[r:r + 1, :n + 2], np.ones((1, n + 2), np.int64))[0][0]
             for r, n in enumerate(lengths)]
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(logits[r, prompt - n:], alone[r][:n], atol=ATOL)
    for step in range(2):
        nxt = np.array([[ids[r, n + step]] for r, n in enumerate(lengths)])
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        logits, past = _run(sess, model, nxt, mask, past)
        for r, n in enumerate(lengths):
            np.testing.assert_allclose(logits[r, 0], alone[r][n + step], atol=ATOL)


def test_genai_batch_with_right_padding():
    """GroupQueryAttention keeps a right-padded cache: row b's valid length is seqlens_k[b] + 1 =
    sum(attention_mask[b]); each row's logits equal its own unpadded run."""
    model = build_genai_past(CFG)
    sess = _session(model)
    ids = np.random.default_rng(4).integers(0, CFG.vocab, (2, 8))
    lengths, prompt = (6, 3), 6
    mask = (np.arange(prompt)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    logits, past = _run(sess, model, np.where(mask == 1, ids[:, :prompt], 0), mask)
    alone = [_run(sess, model, ids[r:r + 1, :n + 2], np.ones((1, n + 2), np.int64))[0][0]
             for r, n in enumerate(lengths)]
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(logits[r, :n], alone[r][:n], atol=ATOL)
    for step in range(2):
        nxt = np.array([[ids[r, n + step]] for r, n in enumerate(lengths)])
        total = prompt + step + 1
        mask = (np.arange(total)[None, :] < np.array(lengths)[:, None] + step + 1).astype(np.int64)
        logits, past = _run(sess, model, nxt, mask, past)
        for r, n in enumerate(lengths):
            np.testing.assert_allclose(logits[r, 0], alone[r][n + step], atol=ATOL)


def test_both_forms_share_weights_and_outliers():
    """Same cfg -> same logits in both forms; the injected outlier channels stand out of the
    first norm's output (the recipe of synthetic.py)."""
    mo, mg = build_optimum_past(CFG), build_genai_past(CFG)
    ids = np.random.default_rng(5).integers(0, CFG.vocab, (1, 7))
    lo, _ = _run(_session(mo), mo, ids, np.ones_like(ids))
    lg, _ = _run(_session(mg), mg, ids, np.ones_like(ids))
    np.testing.assert_allclose(lo, lg, atol=ATOL)
    assert np.abs(lo).max() > 0.1   # not a degenerate all-zero graph
    gamma = next(onnx.numpy_helper.to_array(t) for t in mg.graph.initializer
                 if t.name == "model.layers.0.input_layernorm.weight")
    others = np.delete(np.abs(gamma), CFG.outlier_channels)
    assert np.abs(gamma[list(CFG.outlier_channels)]).min() > 10 * others.max()


def test_seeded_and_distinct_forms():
    a, b = build_optimum_past(CFG), build_optimum_past(CFG)
    assert a.SerializeToString() == b.SerializeToString()
    c = build_optimum_past(SyntheticConfig(seed=1))
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data
    ops = {n.op_type for n in build_genai_past(CFG).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization"} <= ops
    assert "position_ids" not in {i.name for i in build_genai_past(CFG).graph.input}
