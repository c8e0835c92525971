"""What tests and benchmarks share and the product does not: real servers started on loopback
(server.py), tiny models with the real contract (tiny_model.py), a process that sees this CPU
without some of its vector extensions (hidden_cpu_features.py), and TensorRT's Python bindings
loaded where TensorRT is not, to check the code's calls against (nvidia_bindings.py), and KServe's own SDK
clients run against a server from their own venv (kserve_sdk.py)."""
