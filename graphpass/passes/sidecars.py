"""Files that travel with a decoder graph: onnxruntime-genai's genai_config.json and the tokenizer.

genai_config.json names the decoder file (model.decoder.filename); the copy next to the output
names the output instead, so the onnxruntime-genai runtime loads the rewritten graph from that
folder. The other files are copied as they are; nothing is overwritten.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "generation_config.json")


def copy_sidecars(source, output) -> str:
    """Copy genai_config.json (decoder filename -> the output's name) and tokenizer files from the
    source model's folder to the output's; returns a short note for the log ('' when none)."""
    src, out = Path(source).resolve().parent, Path(output).resolve()
    if src == out.parent:
        return ""
    copied = []
    cfg = src / "genai_config.json"
    if cfg.is_file() and not (out.parent / cfg.name).exists():
        data = json.loads(cfg.read_text())
        dec = data.get("model", {}).get("decoder")
        if isinstance(dec, dict):
            dec["filename"] = out.name
        (out.parent / cfg.name).write_text(json.dumps(data, indent=4) + "\n")
        copied.append(cfg.name)
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file() and not (out.parent / name).exists():
            shutil.copyfile(f, out.parent / name)
            copied.append(name)
    return f"; copied {', '.join(copied)}" if copied else ""
