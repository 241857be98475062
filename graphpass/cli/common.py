"""What every command group shares: checked data loading, JSON output, number parsing."""
from __future__ import annotations

import argparse
import json

from pathlib import Path

from graphpass.errors import GraphpassError


def load_checked_data(path: str, model_path: str):
    from graphpass.calibrate.data import check_data, load_data
    from graphpass.graph.decode import conform_empty_past, load_layout
    from graphpass.graph.io import load_model

    model = load_model(model_path, load_weights=False)
    # an empty past holds no value: data built for the float or the int8-cache graph feeds either
    data = conform_empty_past(load_layout(model_path, model), load_data(path))
    check_data(data, model, path)
    return data


def write_json(path: str | None, res: dict) -> None:
    if path:
        from graphpass.graph.io import write_text

        write_text(path, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


def positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


OVERWRITE_HELP = "allow -o to be the input model itself (an existing output file is always replaced)"


def check_output(inp: str, out: str, overwrite: bool, also: tuple = ()) -> None:
    """Before any work: the output must not be the input (unless overwrite), and it and every
    other file named in `also` (a report, say) must be creatable where they go."""
    import os

    from graphpass.graph.io import temp_beside

    if Path(out).resolve() == Path(inp).resolve() and not overwrite:
        raise GraphpassError(f"output {out} is the input model; pass --overwrite to replace it")
    made: list[str] = []
    try:
        for p in [out, *also]:
            if p:   # really create a file: os.access is no test for root
                temp_beside(Path(p), ".probe", made)
    finally:
        for t in made:
            os.unlink(t)


def site_alpha(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for it in items or []:
        key, sep, val = it.rpartition("=")
        try:
            out.append((key, float(val)))
        except ValueError:
            sep = ""
        if not sep or not key:
            raise GraphpassError(f"--site-alpha takes SITE=ALPHA, got '{it}'")
    return tuple(out)
