"""graphpass: offline ONNX rewriting (SmoothQuant + W8A8) for onnxruntime CPU, validated against FP32."""
from .bench import bench
from .data import build_data, load_data, save_data
from .errors import GraphpassError
from .evaluate import evaluate
from .ir import load_model, save_model
from .pipeline import PipelineConfig, quantize

__all__ = ["GraphpassError", "bench", "build_data", "evaluate", "load_data", "load_model",
           "save_data", "save_model", "PipelineConfig", "quantize"]
__version__ = "0.1.0"
