"""FastAPI service: dynamic batching over a TensorRT or ONNX Runtime backend."""
