"""The `graphpass` command. Every user error is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from graphpass.cli.common import positive
from graphpass.errors import GraphpassError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphpass", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from graphpass.cli import generate, quant, report, smooth, validate

    for group in (validate, smooth, quant, report, generate):
        group.add_parsers(sub, positive)
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
