"""KV-cache (with-past) exports: fill their inputs, run them step by step, check them against
transformers, and describe them in model.json.

One step of a with-past graph, past length p, new tokens s:
    inputs   input_ids [b, s], attention_mask = 1 [b, p + s], position_ids = p + arange(s)
             (only if the graph has it), past_key_values.{i}.key/.value [b, kv_heads, p, head_dim]
    outputs  logits [b, s, vocab], present.{i}.key/.value [b, kv_heads, p + s, head_dim]
The prefill has p = 0 (an empty past); each decode step feeds one token and the graph's own
present of the step before, as a generation loop does. The tokens are transformers' greedy
choices, so both sides read the same sequence. Per step:
    err_logits  = max |logits_onnx - logits_torch|
    err_present = max over layers and k/v of |present_onnx - cache_torch| at the positions
                  this step appended (earlier ones are the past fed in, copied)"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import _export as ex

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"


def torch_steps(hf_dir: Path, ids: np.ndarray, steps: int) -> list[dict]:
    """transformers with its DynamicCache: prefill `ids`, then `steps` greedy tokens.
    One dict per step: tokens fed [b, s], logits, presents [(k, v) per layer]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x, cache, seen, out = torch.from_numpy(ids), None, 0, []
    with torch.no_grad():
        for _ in range(steps + 1):
            seen += x.shape[1]
            r = model(input_ids=x, attention_mask=torch.ones(x.shape[0], seen, dtype=torch.int64),
                      past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            kv = [(layer.keys.numpy().copy(), layer.values.numpy().copy()) for layer in cache.layers]
            out.append({"tokens": x.numpy(), "logits": r.logits.numpy(), "presents": kv})
            x = r.logits[:, -1:].argmax(-1)
    return out


def layer_count(sess) -> int:
    names = {i.name for i in sess.get_inputs()}
    n = 0
    while PAST_KEY.format(n) in names:
        n += 1
    return n


def empty_past(layers: int, batch: int, kv_heads: int, head_dim: int) -> list[tuple]:
    """Past of length 0 for every layer: (key, value) each [batch, kv_heads, 0, head_dim]."""
    z = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    return [(z, z)] * layers


def step_feed(sess, tokens: np.ndarray, past: list) -> dict:
    """Inputs of one step, by name (see the module docstring)."""
    names = {i.name for i in sess.get_inputs()}
    b, s = tokens.shape
    p = past[0][0].shape[2]
    feed = {"input_ids": tokens.astype(np.int64),
            "attention_mask": np.ones((b, p + s), np.int64)}
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
    for i, (k, v) in enumerate(past):
        feed[PAST_KEY.format(i)], feed[PAST_VALUE.format(i)] = k, v
    unknown = names - set(feed)
    if unknown:
        raise SystemExit(f"error: cannot fill graph input(s) {', '.join(sorted(unknown))}")
    return feed


def onnx_steps(path: Path, ref: list[dict], kv_heads: int, head_dim: int) -> list[dict]:
    """Run the graph on the tokens of `ref`, feeding its own presents back as past."""
    sess = ex.session(path)
    n = layer_count(sess)
    past = empty_past(n, ref[0]["tokens"].shape[0], kv_heads, head_dim)
    outs = [PRESENT_KEY.format(i) for i in range(n)] + [PRESENT_VALUE.format(i) for i in range(n)]
    got = []
    for step in ref:
        logits, *pres = sess.run(["logits", *outs], step_feed(sess, step["tokens"], past))
        past = list(zip(pres[:n], pres[n:]))
        got.append({"logits": logits, "presents": past})
    return got


def compare_steps(ref: list[dict], got: list[dict]) -> dict:
    """Max abs errors of the prefill and of the decode steps, and greedy agreement."""
    rows = []
    for r, g in zip(ref, got, strict=True):
        if g["logits"].shape != r["logits"].shape:
            raise AssertionError(f"logits {g['logits'].shape} != torch {r['logits'].shape}")
        pairs = [(gk, rk) for gp, rp in zip(g["presents"], r["presents"], strict=True)
                 for gk, rk in zip(gp, rp, strict=True)]
        bad = next(((gk.shape, rk.shape) for gk, rk in pairs if gk.shape != rk.shape), None)
        if bad:
            raise AssertionError(f"present {bad[0]} != transformers cache {bad[1]}")
        new = r["tokens"].shape[1]  # the positions this step appended to the cache
        pres = max(float(np.abs(gk[:, :, -new:] - rk[:, :, -new:]).max()) for gk, rk in pairs)
        rows.append({"logits": float(np.abs(g["logits"] - r["logits"]).max()), "present": pres,
                     "argmax_equal": bool((g["logits"][:, -1].argmax(-1)
                                           == r["logits"][:, -1].argmax(-1)).all())})
    first, rest = rows[0], rows[1:]
    return {"prefill_logits": first["logits"], "prefill_present": first["present"],
            "decode_logits": max(r["logits"] for r in rest),
            "decode_present": max(r["present"] for r in rest),
            "greedy_agree": sum(r["argmax_equal"] for r in rows), "steps": len(rows),
            "max_abs_err": max(max(r["logits"], r["present"]) for r in rows)}


def text_ids(tokenizer_json: Path, play: str, batch: int, seq: int) -> np.ndarray:
    """[batch, seq] token ids from the middle of a Shakespeare play."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(ex.shakespeare(play)).ids
    return ex.token_windows(ids, batch, seq)


def verify(path: Path, hf_dir: Path, ids: np.ndarray, steps: int = 4) -> dict:
    """Prefill `ids` with an empty past, then `steps` decode steps; `compare_steps`, printed."""
    ref = torch_steps(hf_dir, ids, steps)
    info = interface(path, hf_dir)
    res = compare_steps(ref, onnx_steps(path, ref, info["num_kv_heads"], info["head_dim"]))
    res = {"prefill": "x".join(map(str, ids.shape)), **res}
    print("verify " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in res.items()))
    return res


def genai_greedy(folder: Path, prompt: list[int], new: int) -> list[int]:
    """`new` greedy tokens from the onnxruntime-genai runtime (og.Model / og.Generator)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt):]]


def genai_check(folder: Path, hf_dir: Path, prompt: np.ndarray, new: int = 16) -> dict:
    """The genai runtime's greedy continuation of `prompt` [1, P] against transformers'. The
    runtime stops before an end-of-sequence id of genai_config.json; so is transformers' cut."""
    import json

    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    ref = torch_steps(hf_dir, prompt, new - 1)
    want = [int(r["tokens"][0, 0]) for r in ref[1:]] + [int(ref[-1]["logits"][0, -1].argmax())]
    want = want[:next((i for i, t in enumerate(want) if t in eos), new)]
    got, seconds = timed(genai_greedy, folder, prompt[0].tolist(), new)
    agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    res = {"prompt": prompt.shape[1], "new": new, "compared": len(want), "agree": agree,
           "equal": got == want, "seconds": seconds, "tokens": got}
    print(f"genai runtime: {agree}/{len(want)} greedy tokens equal transformers' ({seconds} s)")
    return res


def interface(path: Path, hf_dir: Path) -> dict:
    """model.json fields of a with-past graph: names, layers, heads, node count."""
    import json

    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    cfg = json.loads((hf_dir / "config.json").read_text())
    return {"inputs": [i.name for i in g.input], "outputs": [o.name for o in g.output],
            "past_inputs": [PAST_KEY.format("{i}"), PAST_VALUE.format("{i}")],
            "present_outputs": [PRESENT_KEY.format("{i}"), PRESENT_VALUE.format("{i}")],
            "num_layers": cfg["num_hidden_layers"], "num_heads": cfg["num_attention_heads"],
            "num_kv_heads": cfg["num_key_value_heads"],
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            "vocab_size": cfg["vocab_size"], "nodes": len(g.node)}


def timed(fn, *a, **k) -> tuple[object, float]:
    t0 = time.perf_counter()
    r = fn(*a, **k)
    return r, round(time.perf_counter() - t0, 1)
