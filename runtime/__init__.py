"""The layer that export and service share: running artifacts and knowing whether they are current.

    backend.py      the one backend interface (load, infer a float32 batch to logits, close)
    onnxruntime.py  ONNX Runtime sessions (the one factory every session comes from) and backend
    int8_cpu_graph.py  the in-memory rewrite of an int8 QDQ file that ONNX Runtime's CPU provider runs
    batch_chunks.py the in-memory rewrite that runs the feature layers over the batch in chunks (one-thread CPU sessions)
    onnx_graph.py   ONNX graph helpers (producers and readers, attributes, constants) for rewrites
    tensorrt.py     the TensorRT backend
    cuda.py         CUDA and TensorRT on this host: status, GPU properties, cuda-python calls
    artifacts.py    what an artifact records (ONNX metadata, engine metadata) and whether it is current
    cpu.py          this CPU: model name and vector extensions

It imports model/ (the network's contract) and nothing above it: export and service import it.
Heavy imports (onnxruntime, tensorrt, cuda-python) happen inside functions.
"""
