"""Subcommand generate: text from a with-past graph, streamed; beside a reference on request."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from graphpass.errors import GraphpassError


def _tokenizer_path(a: argparse.Namespace) -> Path:
    if a.tokenizer:
        return Path(a.tokenizer)
    beside = Path(a.model).parent / "tokenizer.json"
    if not beside.is_file():
        raise GraphpassError(f"no tokenizer.json beside {a.model}; give --tokenizer")
    return beside


def _run_one(runner, label: str, tok, prompt: list[int], a, sampling, eos) -> list[int]:
    """Generate with one runner, streaming its text to stdout after `label`; timing to stderr."""
    from graphpass.validate.generate import TextStream, generate_ids

    stream, started = TextStream(tok, prompt), [not label]
    sys.stdout.write(label)
    sys.stdout.flush()
    t0, times = time.perf_counter(), []

    def show(t: int) -> None:
        times.append(time.perf_counter())
        text = stream.feed(t)
        if text and not started[0]:   # "[label] text": one space, whether or not the piece has one
            text, started[0] = (text if text[0].isspace() else " " + text), True
        sys.stdout.write(text)
        sys.stdout.flush()

    ids = generate_ids(runner, prompt, a.max_new_tokens, sampling, eos, show, name=label or "model")
    sys.stdout.write("\n")
    steps = [b - c for b, c in zip(times[1:], times)]
    per = f", {1e3 * sum(steps) / len(steps):.1f} ms/token" if steps else ""
    end = " (EOS)" if ids and ids[-1] in eos else ""
    print(f"{label or 'generate'}: {len(ids)} new tokens{end}, first after "
          f"{1e3 * (times[0] - t0):.0f} ms{per}", file=sys.stderr)
    return ids


def _cmd_generate(a: argparse.Namespace) -> None:
    from graphpass.validate.generate import (Sampling, eos_ids, format_divergence, load_tokenizer,
                                             open_generator)

    tok = load_tokenizer(_tokenizer_path(a))
    prompt = tok.encode(a.prompt).ids
    sampling = Sampling(a.top_k, a.temperature, a.seed)
    eos = [] if a.ignore_eos else eos_ids(a.model, tok)
    cand = open_generator(a.model, a.threads)
    ref = open_generator(a.reference, a.threads) if a.reference else None   # fail before any output
    if ref is None:
        sys.stdout.write(a.prompt)
        _run_one(cand, "", tok, prompt, a, sampling, eos)
        return
    cand_ids = _run_one(cand, "[candidate]", tok, prompt, a, sampling, eos)
    ref_ids = _run_one(ref, "[reference]", tok, prompt, a, sampling, eos)
    print(format_divergence(tok, prompt, cand_ids, ref_ids))


def add_parsers(sub, positive) -> None:
    g = sub.add_parser("generate", help="generate text from a with-past graph (streamed)")
    g.add_argument("model", help="a with-past ONNX graph (optimum-onnx or onnxruntime-genai form)")
    g.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive(int), default=64)
    g.add_argument("--top-k", type=positive(int), help="sample from the K most likely ids (default: greedy)")
    g.add_argument("--temperature", type=positive(float), help="sample at this temperature (default: greedy)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (the reference draws with the same)")
    g.add_argument("--reference", help="also generate from this graph (FP32) and mark where they diverge")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    g.add_argument("--threads", type=positive(int), default=2)
    g.set_defaults(func=_cmd_generate)
