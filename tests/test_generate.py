"""`graphpass generate`: greedy / top-k generation from both with-past forms, streamed text, EOS,
the divergence marker against a reference, and one-line errors.

Greedy tokens are checked against an independent recomputation: the whole sequence prefilled
again at every step (no cache fed back), argmax of its last row."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import cli_error, cli_ok
from onnx import TensorProto, helper, numpy_helper

from graphpass.graph.decode import DecodeRunner, past_layout
from graphpass.graph.runtime import make_session
from graphpass.testing.past import PAST_BUILDS, build_genai_past, build_optimum_past, genai_config
from graphpass.testing.synthetic import SyntheticConfig, build_llama
from graphpass.validate.generate import Sampling, TextStream, divergence, eos_ids, generate_ids, pick

CFG = SyntheticConfig()
PROMPT = " ".join(f"w{i}" for i in range(5, 13))   # 8 tokens of the WordLevel tokenizer below
PROMPT_IDS = list(range(5, 13))
NEW = 24
PERTURB = 0.03   # relative weight noise: greedy tokens agree for a while, then part
BUILDS = PAST_BUILDS


def _runner(model):
    return DecodeRunner(make_session(model, 1), past_layout(model))


def _word_tokenizer(path):
    """WordLevel over the tiny vocabulary: id i <-> 'w{i}', 0 '<eos>', 1 '<bos>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<bos>": 1, **{f"w{i}": i for i in range(2, CFG.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return tok


def _perturbed(model, scale=PERTURB):
    """`model` with every 2-D weight but the embedding / head times (1 + scale * N(0, 1))."""
    m, rng = onnx.ModelProto(), np.random.default_rng(0)
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if len(t.dims) == 2 and "lm_head" not in t.name and "embed" not in t.name:
            a = numpy_helper.to_array(t)
            noisy = a * (1 + scale * rng.standard_normal(a.shape))
            t.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    return m


def _int8_past(model: onnx.ModelProto) -> onnx.ModelProto:
    """The optimum decoder declaring int8 past inputs (Cast to float inside) while its present
    outputs stay float: the float cache it returns cannot be fed back."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    casts = []
    for vi in m.graph.input:
        if vi.name.startswith("past_key_values."):
            vi.type.tensor_type.elem_type = TensorProto.INT8
            casts.append(helper.make_node("Cast", [vi.name], [vi.name + "_f"], to=TensorProto.FLOAT))
    for nd in m.graph.node:
        nd.input[:] = [t + "_f" if t.startswith("past_key_values.") else t for t in nd.input]
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """model folders: optimum/, genai/ (with genai_config.json), perturbed/, nocache/; tok.json."""
    d = tmp_path_factory.mktemp("gen")
    for name, m in (("optimum", build_optimum_past(CFG)), ("genai", build_genai_past(CFG)),
                    ("perturbed", _perturbed(build_optimum_past(CFG))), ("nocache", build_llama(CFG))):
        (d / name).mkdir()
        onnx.save(m, d / name / "model.onnx")
    cfg = genai_config(CFG)
    cfg["model"]["eos_token_id"] = -1    # none: the tiny decoder never stops on its own
    (d / "genai" / "genai_config.json").write_text(json.dumps(cfg))
    _word_tokenizer(d / "tok.json")
    return d


def _recomputed_greedy(model, prompt, n):
    run, seq = _runner(model), list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(run.prefill(np.array([seq]))[0, -1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("form", ["optimum", "genai"])
def test_greedy_equals_recomputing_the_whole_sequence(form):
    model = BUILDS[form](CFG)
    got = generate_ids(_runner(model), PROMPT_IDS, NEW)
    assert got == _recomputed_greedy(model, PROMPT_IDS, NEW)


def test_both_forms_generate_the_same_text_through_the_cli(folder, capsys):
    texts = {}
    for form in ("optimum", "genai"):
        out, err = cli_ok(capsys, ["generate", folder / form / "model.onnx", "--tokenizer",
                                   folder / "tok.json", "--prompt", PROMPT, "--max-new-tokens", NEW])
        texts[form] = out
        assert f"{NEW} new tokens" in err
    want = " ".join(f"w{i}" for i in _recomputed_greedy(build_optimum_past(CFG), PROMPT_IDS, NEW))
    assert texts["optimum"] == texts["genai"] == PROMPT + " " + want + "\n"


def test_generation_stops_at_the_eos_id(folder, tmp_path, capsys):
    greedy = generate_ids(_runner(build_optimum_past(CFG)), PROMPT_IDS, NEW)
    k = 3                                            # stop on the 4th token's id
    first = greedy.index(greedy[k])                  # ... or earlier, if that id came before
    (tmp_path / "model.json").write_text(json.dumps({"eos_token_id": greedy[k]}))
    onnx.save(build_optimum_past(CFG), tmp_path / "model.onnx")
    assert eos_ids(tmp_path / "model.onnx") == [greedy[k]]
    out, err = cli_ok(capsys, ["generate", tmp_path / "model.onnx", "--tokenizer", folder / "tok.json",
                               "--prompt", PROMPT, "--max-new-tokens", NEW])
    assert out.split()[len(PROMPT_IDS):] == [f"w{i}" for i in greedy[:first + 1]]
    assert f"{first + 1} new tokens (EOS)" in err
    out, _ = cli_ok(capsys, ["generate", tmp_path / "model.onnx", "--tokenizer", folder / "tok.json",
                             "--prompt", PROMPT, "--max-new-tokens", NEW, "--ignore-eos"])
    assert len(out.split()) == len(PROMPT_IDS) + NEW


def test_eos_from_genai_config_and_from_the_tokenizer(folder, tmp_path):
    from tokenizers import Tokenizer

    assert eos_ids(folder / "genai" / "model.onnx") == [-1]
    tok = Tokenizer.from_file(str(folder / "tok.json"))
    tok.add_special_tokens(["<|endoftext|>"])
    assert eos_ids(tmp_path / "model.onnx", tok) == [tok.token_to_id("<|endoftext|>")]
    assert eos_ids(tmp_path / "model.onnx") == []


def test_sampling_is_seeded_top_k_bounded_and_top_1_is_greedy():
    model = build_optimum_past(CFG)
    greedy = generate_ids(_runner(model), PROMPT_IDS, NEW)
    assert generate_ids(_runner(model), PROMPT_IDS, NEW, Sampling(top_k=1, temperature=5.0)) == greedy
    s = Sampling(top_k=5, temperature=3.0, seed=7)
    a, b = (generate_ids(_runner(model), PROMPT_IDS, NEW, s) for _ in range(2))
    assert a == b and a != greedy
    run = _runner(model)                             # each draw is among that step's 5 best
    for t, tok in enumerate(a):
        logits = run.prefill(np.array([PROMPT_IDS + a[:t]]))[0, -1]
        assert tok in np.argsort(-logits)[:5]


def test_pick_follows_the_softmax_of_the_top_k():
    logits = np.array([0.0, 1.0, 2.0, 3.0, -50.0])
    rng, s = np.random.default_rng(0), Sampling(top_k=3, temperature=2.0)
    draws = np.bincount([pick(logits, s, rng) for _ in range(20000)], minlength=5)
    p = np.exp(np.array([1.0, 2.0, 3.0]) / 2.0)
    p /= p.sum()
    assert draws[0] == draws[4] == 0
    np.testing.assert_allclose(draws[1:4] / 20000, p, atol=0.015)   # ~4 sigma of a binomial at n=20k


def test_streamed_pieces_of_a_byte_level_bpe_are_whole_characters(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat " * 20],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    prompt = tok.encode("the cat").ids
    new = tok.encode(" sat on ✓ 日本 é mat").ids
    assert len(new) > len(" sat on ✓ 日本 é mat".split())     # multi-byte characters span tokens
    stream = TextStream(tok, prompt)
    pieces = [stream.feed(i) for i in new]
    assert "".join(pieces) == tok.decode(prompt + new)[len(tok.decode(prompt)):] == " sat on ✓ 日本 é mat"
    assert not any("\ufffd" in p for p in pieces) and pieces.count("") >= 2


def test_reference_marks_where_a_perturbed_candidate_diverges(folder, capsys):
    cand = generate_ids(_runner(_perturbed(build_optimum_past(CFG))), PROMPT_IDS, NEW)
    ref = generate_ids(_runner(build_optimum_past(CFG)), PROMPT_IDS, NEW)
    k = divergence(cand, ref)
    assert k is not None and 0 < k < NEW, k                 # the fixture parts after a while
    out, _ = cli_ok(capsys, ["generate", folder / "perturbed" / "model.onnx", "--reference",
                             folder / "optimum" / "model.onnx", "--tokenizer", folder / "tok.json",
                             "--prompt", PROMPT, "--max-new-tokens", NEW])
    lines = out.splitlines()
    assert lines[0] == "[candidate] " + " ".join(f"w{i}" for i in cand)
    assert lines[1] == "[reference] " + " ".join(f"w{i}" for i in ref)
    assert lines[2].startswith(f"diverge at token {k} ")
    assert lines[3] == "common:      " + repr(" " + " ".join(f"w{i}" for i in ref[:k]))
    assert lines[4] == "[candidate] " + repr(" " + " ".join(f"w{i}" for i in cand[k:]))
    assert lines[5] == "[reference] " + repr(" " + " ".join(f"w{i}" for i in ref[k:]))


def test_reference_equal_to_the_candidate_says_they_agree(folder, capsys):
    out, _ = cli_ok(capsys, ["generate", folder / "genai" / "model.onnx", "--reference",
                             folder / "optimum" / "model.onnx", "--tokenizer", folder / "tok.json",
                             "--prompt", PROMPT, "--max-new-tokens", 8, "--top-k", 4, "--seed", 3])
    assert out.splitlines()[-1] == "candidate and reference agree on all 8 tokens"


def test_bad_input_is_one_line(folder, tmp_path, capsys):
    tok = folder / "tok.json"
    err = cli_error(capsys, ["generate", folder / "nocache" / "model.onnx", "--tokenizer", tok,
                             "--prompt", PROMPT])
    assert "generate needs a with-past graph" in err
    err = cli_error(capsys, ["generate", folder / "optimum" / "model.onnx", "--reference",
                             folder / "nocache" / "model.onnx", "--tokenizer", tok, "--prompt", PROMPT])
    assert "generate needs a with-past graph" in err
    bad_cache = tmp_path / "int8past.onnx"
    onnx.save(_int8_past(build_optimum_past(CFG)), bad_cache)
    err = cli_error(capsys, ["generate", bad_cache, "--tokenizer", tok, "--prompt", PROMPT])
    assert "is float32 but past input 'past_key_values.0.key' takes int8" in err
    assert "no such tokenizer" in cli_error(capsys, ["generate", folder / "optimum" / "model.onnx",
                                                     "--tokenizer", tmp_path / "none.json", "--prompt", "x"])
    (tmp_path / "bad.json").write_text("{")
    assert "tokenizer.json" in cli_error(capsys, ["generate", folder / "optimum" / "model.onnx",
                                                  "--tokenizer", tmp_path / "bad.json", "--prompt", "x"])
    assert "no tokens" in cli_error(capsys, ["generate", folder / "optimum" / "model.onnx",
                                             "--tokenizer", tok, "--prompt", ""])
    assert "no tokenizer.json beside" in cli_error(capsys, ["generate", folder / "optimum" / "model.onnx",
                                                            "--prompt", PROMPT])
    assert "must be positive" in cli_error(capsys, ["generate", folder / "optimum" / "model.onnx",
                                                    "--tokenizer", tok, "--prompt", PROMPT, "--top-k", 0])
