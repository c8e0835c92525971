"""What tests and benchmarks share and the product does not: real servers started on loopback."""
