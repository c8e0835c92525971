"""What tests and benchmarks share and the product does not: real servers started on loopback
(server.py), tiny models with the real contract (tiny_model.py), and a process that sees this CPU
without some of its vector extensions (hidden_cpu_features.py)."""
