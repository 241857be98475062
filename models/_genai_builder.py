"""onnxruntime-genai's model builder under transformers 4.57 (the version optimum-onnx needs).

    python models/_genai_builder.py -i HF_FOLDER -o OUT -p fp32 -e cpu [builder options]

Runs `python -m onnxruntime_genai.models.builder` unchanged after two adaptations, both only for
what the builder 0.18.0 reads from transformers 5.x:
- it imports Qwen3_5ForConditionalGeneration and Qwen3_5MoeForConditionalGeneration at module
  level; 4.57 has neither, so they become placeholders that raise if a Qwen3.5 model is built;
- it reads RoPE settings from `config.rope_parameters` (5.x), collapsing `rope_scaling` into it;
  4.57 keeps `rope_scaling = None` for plain RoPE, which the builder cannot iterate, so it becomes
  {"rope_type": "default"}: the same rotary embedding (theta stays config.rope_theta)."""
from __future__ import annotations

import runpy
import sys

ABSENT = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def adapt_transformers() -> None:
    import transformers

    for name in ABSENT:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (_Absent,), {}))
    load = transformers.AutoConfig.from_pretrained
    if getattr(load, "_graphpass", False):
        return

    def from_pretrained(*args, **kwargs):
        config = load(*args, **kwargs)
        if getattr(config, "rope_scaling", "absent") is None:
            config.rope_scaling = {"rope_type": "default"}
        return config

    from_pretrained._graphpass = True
    transformers.AutoConfig.from_pretrained = from_pretrained


class _Absent:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} needs transformers 5.x")


def main(argv: list[str]) -> None:
    adapt_transformers()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
