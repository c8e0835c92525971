"""Paddle weights -> ONNX -> TensorRT engine, verified at every step (`python -m export`)."""
