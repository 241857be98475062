"""Text generation from a with-past graph, streamed token by token, optionally beside a reference.

From prompt ids x, with the cache fed back each step (graph.decode.DecodeRunner):
  l_0 = g(x)[-1],  y_i = pick(l_i),  l_{i+1} = g(y_i | cache)[-1]   until y_i is an EOS id or
  max_new_tokens are out.
  pick = argmax (greedy, the default), or a draw from softmax(top_k(l) / T) with a seeded
  generator (top-k / temperature sampling; the same seed gives the same draws, so a candidate
  and its reference sample alike wherever their logits agree).
Text is decoded incrementally (tokenizers' DecodeStream, primed with the prompt), so a character
split over several byte tokens is printed once complete. With a reference, the divergence is the
first index k where the two token sequences differ.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphpass.errors import GraphpassError
from graphpass.validate.bench_decode import check_feedback, open_decoder

EOS_NAMES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>", "<|end|>")


@dataclass(frozen=True)
class Sampling:
    """greedy when top_k is None and temperature is None; else top-k (all ids if None) at T (1.0)."""
    top_k: int | None = None
    temperature: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.top_k is None and self.temperature is None


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise GraphpassError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise GraphpassError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def eos_ids(model_path: str | os.PathLike, tokenizer=None) -> list[int]:
    """EOS ids from genai_config.json, then generation_config.json / config.json / model.json
    beside the model, else the tokenizer's usual end tokens; [] when none is known."""
    folder = Path(model_path).parent
    for name, keys in (("genai_config.json", ("model", "eos_token_id")), ("generation_config.json",
                       ("eos_token_id",)), ("config.json", ("eos_token_id",)), ("model.json", ("eos_token_id",))):
        v = _json_get(folder / name, keys)
        if v is not None:
            return [int(i) for i in (v if isinstance(v, list) else [v])]
    if tokenizer is None:
        return []
    return [i for i in (tokenizer.token_to_id(t) for t in EOS_NAMES) if i is not None][:1]


def _json_get(p: Path, keys: tuple[str, ...]):
    if not p.is_file():
        return None
    try:
        v = json.loads(p.read_text())
    except (OSError, ValueError):
        raise GraphpassError(f"{p}: not readable JSON") from None
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next id from one row of logits [V]."""
    if sampling.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / (sampling.temperature or 1.0)
    k = min(sampling.top_k or z.size, z.size)
    top = np.argpartition(-z, k - 1)[:k]
    top = top[np.argsort(-z[top], kind="stable")]     # a fixed order: draws depend on the seed only
    p = np.exp(z[top] - z[top].max())
    return int(top[rng.choice(k, p=p / p.sum())])


def generate_ids(runner, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 eos: list[int] = (), on_token: Callable[[int], None] | None = None,
                 name: str = "model") -> list[int]:
    """New token ids after `prompt` (EOS included when reached); on_token(id) as each arrives."""
    if not prompt:
        raise GraphpassError("the prompt encodes to no tokens")
    rng = np.random.default_rng(sampling.seed)
    logits = runner.prefill(np.array([prompt], np.int64))[0, -1]
    check_feedback(runner, name)
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = pick(logits, sampling, rng)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos or len(out) == max_new_tokens:
            break
        logits = runner.step(np.array([[tok]], np.int64))[0, -1]
    return out


class TextStream:
    """Incremental text of new ids after a prompt: feed(id) -> the text that became complete."""

    def __init__(self, tokenizer, prompt: list[int]):
        from tokenizers.decoders import DecodeStream

        self.tok = tokenizer
        self.stream = DecodeStream(ids=list(prompt), skip_special_tokens=False)

    def feed(self, tok: int) -> str:
        return self.stream.step(self.tok, tok) or ""


def continuation_text(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """Text of `ids` as it reads after the prompt (the streamed pieces, joined)."""
    s = TextStream(tokenizer, prompt)
    return "".join(s.feed(i) for i in ids)


def divergence(cand: list[int], ref: list[int]) -> int | None:
    """First index where the two sequences differ (a shorter one differs where it ends); None if equal."""
    k = next((i for i, (c, r) in enumerate(zip(cand, ref)) if c != r), min(len(cand), len(ref)))
    return None if k == len(cand) == len(ref) else k


def format_divergence(tokenizer, prompt: list[int], cand: list[int], ref: list[int]) -> str:
    """Where the candidate's continuation first leaves the reference's, in text and token index."""
    k = divergence(cand, ref)
    if k is None:
        return f"candidate and reference agree on all {len(ref)} tokens"
    common = continuation_text(tokenizer, prompt, ref[:k])
    rest = {n: continuation_text(tokenizer, prompt, ids)[len(common):] for n, ids in
            (("candidate", cand), ("reference", ref))}
    return "\n".join([f"diverge at token {k} (the first {k} of {len(cand)} / {len(ref)} agree)",
                      f"common:      {common!r}", f"[candidate] {rest['candidate']!r}",
                      f"[reference] {rest['reference']!r}"])


def open_generator(path: str | os.PathLike, threads: int = 2):
    return open_decoder(path, threads, "generate")
