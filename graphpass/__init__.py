"""graphpass: offline ONNX rewriting (SmoothQuant + W8A8) for onnxruntime CPU, validated against FP32."""
from graphpass.validate.bench import bench
from graphpass.calibrate.data import build_data, load_data, save_data
from graphpass.errors import GraphpassError
from graphpass.validate.evaluate import evaluate
from graphpass.graph.io import load_model, save_model
from graphpass.pipeline import PipelineConfig, quantize

__all__ = ["GraphpassError", "bench", "build_data", "evaluate", "load_data", "load_model",
           "save_data", "save_model", "PipelineConfig", "quantize"]
__version__ = "0.1.0"
