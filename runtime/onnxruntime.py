"""ONNX Runtime: the one session factory, and the backend over it.

Every session the project creates (the service, export verification, every benchmark) comes from
`create_session`, so that what is measured is what is served:

* denormals as zero (`session.set_denormal_as_zero`): subnormal activations cost ~100x per
  product on some CPUs (../shared/notes/subnormals.md); the export flushes subnormal weights too.
  That option covers ONNX Runtime's pool threads only, so each `run` of a session made here sets the
  same mode in the calling thread for its duration (runtime/cpu.py);
* idle intra-op threads sleep instead of spinning (`session.intra_op.allow_spinning` 0): spinning
  takes the cores that HTTP handling and image decoding share with inference; a sleeping pool
  costs a little latency per batch only;
* `threads` intra-op threads per session (default: ONNX Runtime's, one per core), one inter-op.

An int8 QDQ file runs on the CPU as runtime/int8_cpu_graph.py rewrites it (unsigned activations;
the file on disk, which TensorRT builds from, is unchanged). A session of one thread on the CPU runs
AlexNet-ACmix's feature layers over the batch in chunks of 16 images (runtime/batch_chunks.py), which
keeps the ACmix layers' tensors in the cache at large batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model.spec import INPUT_NAME, OUTPUT_NAME
from runtime.backend import Backend, BackendError
from runtime.batch_chunks import CHUNK, in_batch_chunks
from runtime.cpu import denormals_as_zero
from runtime.int8_cpu_graph import cpu_graph

SESSION_CONFIG = {
    "session.set_denormal_as_zero": "1",
    "session.intra_op.allow_spinning": "0",
}


def session_options(threads: int | None = None):
    """The SessionOptions every session of the project uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


class Session:
    """An onnxruntime.InferenceSession whose `run` computes with denormals as zero in the calling
    thread too (module docstring); everything else is the session's own. `batch_chunk`: the images
    per chunk its feature layers run over (runtime/batch_chunks.py), or None where they run on the
    whole batch."""

    def __init__(self, session, batch_chunk: int | None = None):
        self.session = session
        self.batch_chunk = batch_chunk

    def run(self, *args, **kwargs):
        with denormals_as_zero():
            return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def chunked_session(graph: bytes, path: Path, threads: int | None, providers: list[str]) -> Session | None:
    """A session over `graph` with its feature layers in chunks of the batch (runtime/batch_chunks.py),
    or None where the rewrite does not apply, or fails, or ONNX Runtime refuses its graph (logged):
    the chunks only make a session faster, so such a graph runs as written rather than not at all."""
    import onnxruntime as ort

    try:
        chunked = in_batch_chunks(graph)
        if chunked is None:
            return None
        return Session(ort.InferenceSession(chunked, session_options(threads), providers=providers), CHUNK)
    except Exception as exc:  # onnx's shape inference, protobuf and onnxruntime raise their own types
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        logging.getLogger(__name__).warning("%s: feature layers on the whole batch, not in chunks (%s: %s)",
                                            path, type(exc).__name__, message)
        return None


def create_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                   batch_chunks: bool = True):
    """`_create_session`, the calling thread's floating-point mode kept: ONNX Runtime sets denormals as
    zero for good in the thread that creates the process's first session (runtime/cpu.py), which in
    the service is the event loop's, where every request's own arithmetic then flushed subnormals (a
    timeout of 5e-324 ms read as 0)."""
    with denormals_as_zero(False):  # restores the caller's mode on the way out
        return _create_session(path, threads, providers, batch_chunks)


def _create_session(path: str | Path, threads: int | None, providers: list[str] | None, batch_chunks: bool):
    """An InferenceSession over `path` with the project's options; BackendError naming the file if
    it is missing or ONNX Runtime cannot load it. providers default to CUDA where ONNX Runtime has
    it, then the CPU. On the CPU, the graph is cpu_graph's, and with one thread (and `batch_chunks`)
    its feature layers run in chunks of the batch where chunked_session can (module docstring)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BackendError(f"{path}: no such ONNX file")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        graph = str(path)
        if providers[:1] == ["CPUExecutionProvider"]:
            graph = cpu_graph(path)
            session = chunked_session(graph, path, threads, providers) if threads == 1 and batch_chunks else None
            if session is not None:
                return session
        return Session(ort.InferenceSession(graph, session_options(threads), providers=providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    concurrent = True  # InferenceSession.run is thread-safe

    def __init__(self, onnx_path: str | Path, max_batch: int, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(max_batch)
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.providers = providers
        self.session = None

    def _load(self) -> None:
        # Batches of CHUNK images or fewer would run the loop once: its cost without its gain.
        self.session = create_session(self.onnx_path, self.threads, self.providers, batch_chunks=self.max_batch > CHUNK)
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if inputs != {INPUT_NAME: "tensor(float)"} or OUTPUT_NAME not in outputs:
            self.session = None
            raise BackendError(f"{self.onnx_path}: expected input {INPUT_NAME} float and output {OUTPUT_NAME}")
        provider = self.session.get_providers()[0]
        self.description = f"{self.onnx_path} on {provider}"
        if provider == "CPUExecutionProvider":  # which kernels run: the CPU's extensions, and the threads
            from runtime.cpu import describe

            threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "a thread per core"
            chunks = f", feature layers in chunks of {self.session.batch_chunk} images" if self.session.batch_chunk else ""
            self.description += f" ({threads} per batch{chunks}; {describe()})"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def _close(self) -> None:
        self.session = None
