"""Peak memory of eval, the accuracy budget, debug and report on a 262,144-token decoder does not
grow with the number of samples and stays under 2 x the FP32 model size + 1 GiB (issue 15).

Each command runs in a child process (graphpass.testing.big_vocab.cli_peak_memory reads
RUSAGE_CHILDREN.ru_maxrss). At SEQ tokens one sample has SEQ x 262,144 x 4 B = 32 MiB of logits:
holding the logits of every sample would add (MANY - FEW) x 32 MiB = 128 MiB between the two
runs, four times the FLAT allowance; a float64 log-softmax of whole batches (the implementation
this replaced) peaked at ~16 batches of logits, over the bound."""
from __future__ import annotations

import numpy as np
import pytest

from graphpass.graph.io import model_size
from graphpass.testing.big_vocab import BIG_VOCAB, build_big_vocab_decoder, cli_peak_memory, write_big_vocab_folder
from graphpass.testing.synthetic import random_inputs

SEQ = 32
FEW, MANY = 2, 6                 # samples: both fill eval's batch of 2
FLAT = 32 << 20                  # bytes: peak(MANY) - peak(FEW) may differ by allocator noise only
GIB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigvocab")
    ref, calib = write_big_vocab_folder(d / "ref", samples=4, seq=SEQ)
    m = build_big_vocab_decoder()
    for n in (FEW, MANY):
        np.savez(d / f"held{n}.npz", **random_inputs(m, n, SEQ, seed=100 + n))
    cand = d / "int8.onnx"
    r = cli_peak_memory(["quantize", ref, "-o", cand, "--data", calib, "--scheme", "dynamic", "--no-smooth"])
    assert r["rc"] == 0, r["stderr"]
    return d, ref, calib, cand


def _bound(ref) -> int:
    return 2 * model_size(ref) + GIB


def _flat_and_bounded(runs: dict[int, dict], bound: int) -> None:
    for n, r in runs.items():
        assert r["rc"] == 0, r["stderr"]
        assert r["peak_bytes"] <= bound, (n, r["peak_bytes"] >> 20, bound >> 20)
    assert runs[MANY]["peak_bytes"] - runs[FEW]["peak_bytes"] <= FLAT, \
        {n: r["peak_bytes"] >> 20 for n, r in runs.items()}


def test_fixture_has_the_big_vocabulary(big):
    import onnx

    _, ref, _, _ = big
    out = onnx.load(str(ref), load_external_data=False).graph.output[0]
    assert out.type.tensor_type.shape.dim[-1].dim_value == BIG_VOCAB
    assert model_size(ref) < 100e6          # tiny body: the table is the model


def test_eval_memory_is_flat_in_samples(big):
    d, ref, _, cand = big
    runs = {n: cli_peak_memory(["eval", cand, "--reference", ref, "--data", d / f"held{n}.npz",
                                "--json", d / f"eval{n}.json"]) for n in (FEW, MANY)}
    _flat_and_bounded(runs, _bound(ref))
    assert "KL" in runs[MANY]["stdout"]


def test_budget_memory_is_flat_in_held_out_samples(big):
    d, ref, calib, _ = big
    runs = {n: cli_peak_memory(["quantize", ref, "-o", d / f"budget{n}.onnx", "--data", calib,
                                "--holdout", d / f"held{n}.npz", "--scheme", "dynamic", "--no-smooth",
                                "--max-ppl-increase", "1.0", "--bench-seconds", "0"]) for n in (FEW, MANY)}
    _flat_and_bounded(runs, _bound(ref))
    assert f"on {MANY} held-out samples" in runs[MANY]["stdout"]


def test_debug_memory_is_flat_in_samples(big):
    d, ref, _, cand = big
    runs = {n: cli_peak_memory(["debug", ref, cand, "--data", d / f"held{n}.npz"]) for n in (FEW, MANY)}
    _flat_and_bounded(runs, _bound(ref))


LONG_SEQ = 512                   # one sample: 512 x 262,144 x 4 B = 512 MiB of logits per model


def test_debug_memory_is_bounded_at_512_tokens(big):
    """Batches of one 512-token sample, 512 MiB of logits per model: the reference's, the
    candidate's and their difference must never sit in memory together, nor pile up per batch
    (the LM head is compared in row chunks by a session of its own, debug_wide)."""
    d, ref, _, cand = big
    m = build_big_vocab_decoder()
    runs = {}
    for n in (1, 4):
        np.savez(d / f"long{n}.npz", **random_inputs(m, n, LONG_SEQ, seed=200 + n))
        runs[n] = cli_peak_memory(["debug", ref, cand, "--data", d / f"long{n}.npz", "--batch-size", 1])
    bound = 2 * model_size(ref) + GIB                       # 2 x 67 MB + 1 GiB = 1.13 GiB
    for n, r in runs.items():
        assert r["rc"] == 0, r["stderr"]
        assert r["peak_bytes"] <= bound, (n, r["peak_bytes"] >> 20, bound >> 20)
    assert runs[4]["peak_bytes"] - runs[1]["peak_bytes"] <= FLAT, {n: r["peak_bytes"] >> 20 for n, r in runs.items()}
    assert "kept in float: /lm_head/MatMul" in runs[4]["stdout"]


def test_report_memory_is_bounded(big):
    """report = debug + eval (flat above) + a fixed number of calibration samples for its plots."""
    d, ref, _, cand = big
    r = cli_peak_memory(["report", ref, cand, "--data", d / f"held{MANY}.npz", "-o", d / "r.html",
                         "--bench-seconds", "0"])
    assert r["rc"] == 0, r["stderr"]
    assert r["peak_bytes"] <= _bound(ref), (r["peak_bytes"] >> 20, _bound(ref) >> 20)


def test_eval_batch_is_capped_by_the_size_of_its_logits():
    """512 tokens x 262,144 x 4 B = 512 MiB of logits per sample: a batch of 2 (1 GiB per model)
    would break the bound of a small model, so eval runs such data one sample at a time; at 32
    tokens (32 MiB per sample) the batch stays as asked."""
    from graphpass.validate.evaluate import OUTPUT_BUDGET, capped_batch

    m = build_big_vocab_decoder()
    long = {"input_ids": np.zeros((4, 512), np.int64)}
    short = {"input_ids": np.zeros((4, SEQ), np.int64)}
    assert capped_batch(m, ["logits"], long, 2) == 1
    assert capped_batch(m, ["logits"], short, 2) == 2
    assert capped_batch(m, ["logits"], short, 64) == OUTPUT_BUDGET // (SEQ * BIG_VOCAB * 4)


def test_report_with_its_latency_bench_is_bounded_at_512_tokens(big):
    """Regression: report's 1x512 bench ran the two sessions with their arenas, each keeping a
    512 MiB block of logits at 262k: 2.66 GiB against the 1.13 GiB bound. Outputs over the eval
    budget now run both sessions without an arena (validate/bench.py)."""
    d, ref, _, cand = big
    np.savez(d / "one512.npz", **random_inputs(build_big_vocab_decoder(), 1, LONG_SEQ, seed=300))
    r = cli_peak_memory(["report", ref, cand, "--data", d / "one512.npz", "-o", d / "r512.html",
                         "--bench-seconds", "0.5"])
    assert r["rc"] == 0, r["stderr"]
    assert r["peak_bytes"] <= _bound(ref), (r["peak_bytes"] >> 20, _bound(ref) >> 20)
