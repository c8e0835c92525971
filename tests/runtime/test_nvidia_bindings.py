"""The TensorRT and CUDA code against NVIDIA's real Python bindings, without a GPU: TensorRT's
bindings of each supported major version imported over stub libraries (harness/nvidia_bindings.py)
and cuda-python as the GPU image pins it. What TensorRT and CUDA then do is the gpu-marked tests'."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from harness.nvidia_bindings import RECEIVERS, bindings_folders, check, unavailable
from runtime.backend import BackendError
from runtime.cuda import CudaError, cuda_call, stream_handle, tensorrt_status

FOLDERS = bindings_folders()
WHY = unavailable() or (None if FOLDERS else "no TensorRT bindings in .venv/tensorrt-*/ (make setup installs them)")
needs_bindings = pytest.mark.skipif(WHY is not None, reason=f"cannot load TensorRT's bindings here: {WHY}")
try:
    from cuda.bindings import runtime as cudart
except ImportError:
    cudart = None
# cuda-python's real answers without a driver (this machine); where one is, its calls succeed.
CUDA_WHY = ("cuda-python is not installed (make setup installs it)" if cudart is None else
            "a CUDA driver is here: its calls succeed" if cudart.cudaGetDeviceCount()[0].value == 0 else None)
without_a_driver = pytest.mark.skipif(CUDA_WHY is not None, reason=str(CUDA_WHY))


@needs_bindings
def test_both_major_versions_the_code_is_written_for_are_checked():
    assert {folder.name.split("-")[1].split(".")[0] for folder in FOLDERS} >= {"10", "11"}


@needs_bindings
@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_every_tensorrt_and_cuda_call_of_the_code_exists_with_its_documented_signature(folder):
    report = check(folder)
    assert report["tensorrt"] == folder.name.removeprefix("tensorrt-")
    assert report["problems"] == []
    # The walk reaches constructors, methods, chained results, properties set, enums and cuda-python.
    assert {"tensorrt.Builder()", "Builder.create_network()", "IOptimizationProfile.set_shape()",
            "IBuilderConfig.set_timing_cache()", "ITimingCache.serialize()", "ITensor.name", "ParserError.desc()",
            "IBuilderConfig.progress_monitor=", "IExecutionContext.execute_async_v3()",
            "ICudaEngine.get_tensor_profile_shape()", "TensorIOMode.INPUT", "cudart.cudaMemcpyAsync()",
            "cudaMemcpyKind.cudaMemcpyHostToDevice", "cudaDeviceProp.name",
            "cuda.bindings.utils.get_cuda_native_handle"} <= set(report["checked"])
    # What the code only uses where present is present in both: fp32 engines without TF32, strongly
    # typed networks, a progress bar.
    assert report["optional"] == {"BuilderFlag.TF32": True, "NetworkDefinitionCreationFlag.STRONGLY_TYPED": True,
                                  "tensorrt.IProgressMonitor": True}
    # Run over the real classes: the flag's bit (STRONGLY_TYPED follows the deprecated EXPLICIT_BATCH in
    # TensorRT 10, comes first in 11), and the progress monitor as TensorRT calls it.
    bit = {"10": 1, "11": 0}[report["tensorrt"].split(".")[0]]
    assert report["ran"] == {"strongly_typed_flags": 1 << bit, "progress_monitor_is_IProgressMonitor": True,
                             "progress_monitor_steps": [True, True]}


@needs_bindings
def test_the_check_finds_what_tensorrt_and_cuda_python_would_refuse(tmp_path):
    source = tmp_path / "wrong.py"
    source.write_text(
        "import tensorrt as trt\n"
        "from cuda.bindings import runtime as cudart\n"
        "from cuda.bindings.utils import no_such_helper\n"
        "def build(builder, config, engine, cache, context):\n"
        "    builder.create_netwrk(0)\n"
        "    config.set_timing_cache(cache, ignore=False)\n"
        "    engine.num_io_tensors = 3\n"
        "    cudart.cudaMemcpyAsync(1, 2, 3)\n"
        "    trt.BuilderFlag.FP64\n"
        "    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)\n"
        "    context.execute_async_v2([], 0)\n"
    )
    receivers = {"builder": "tensorrt.Builder", "config": "tensorrt.IBuilderConfig", "engine": "tensorrt.ICudaEngine",
                 "context": "tensorrt.IExecutionContext", "runtime": "tensorrt.Runtime"}
    report = check(FOLDERS[-1], {str(source): receivers})
    problems = [p.removeprefix(f"{source}") for p in report["problems"]]
    assert problems[:7] == [
        ":3: cuda.bindings.utils has no no_such_helper",
        ":5: Builder.create_netwrk: no such attribute",
        ":6: IBuilderConfig.set_timing_cache() called (_, ignore=) matches none of: (cache, ignore_mismatch)",
        ":7: ICudaEngine.num_io_tensors: read-only",
        ":8: cudart.cudaMemcpyAsync() called (_, _, _) matches none of: (dst, src, count, kind: 'cudaMemcpyKind', "
        "stream)",
        ":9: BuilderFlag.FP64: no such attribute",
        ":11: IExecutionContext.execute_async_v2: no such attribute",  # TensorRT 8's, gone in 10
    ]
    assert problems[7:] == [": 'runtime' is declared in RECEIVERS but not used there"]
    assert "IBuilderConfig.set_memory_pool_limit()" in report["checked"]


def test_the_receivers_name_every_file_that_imports_tensorrt_or_cuda_python():
    root = Path(__file__).resolve().parents[2]

    def imports_nvidia(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] in ("tensorrt", "cuda") for name in names):
                return True
        return False

    calling = {str(p.relative_to(root)) for folder in ("export", "runtime", "service", "benchmarks", "model")
               for p in (root / folder).rglob("*.py") if imports_nvidia(p)}
    assert calling == set(RECEIVERS)


@without_a_driver
def test_a_real_cuda_error_is_a_cuda_error_naming_it():
    with pytest.raises(CudaError, match=r"CUDA error 35 \(cudaErrorInsufficientDriver\)"):
        cuda_call(cudart.cudaGetDeviceCount())
    assert stream_handle(cudart.cudaStream_t(0)) == 0 and stream_handle(cudart.cudaStream_t(4096)) == 4096


@without_a_driver
def test_tensorrt_without_a_cuda_driver_is_unavailable_saying_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.2.1.2-fake"))
    ok, reason = tensorrt_status()
    assert not ok and reason == "no CUDA GPU is visible (CUDA error 35 (cudaErrorInsufficientDriver))"


@without_a_driver
def test_buffers_cuda_cannot_make_are_one_backend_error_and_nothing_is_kept(tmp_path, monkeypatch):
    """A fake of tensorrt (its engine loads and makes a context) over the real cuda-python, whose
    first call, the stream, fails without a driver."""
    import runtime.tensorrt as backend_module
    from tests.runtime.test_tensorrt_backend import FakeEngine, fake_tensorrt

    class EngineWithContext(FakeEngine):
        def create_execution_context(self):
            return types.SimpleNamespace(set_tensor_address=lambda name, address: True)

    trt = fake_tensorrt()
    trt.Runtime.deserialize_cuda_engine = lambda self, data: EngineWithContext()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"an engine")
    backend = backend_module.TensorRTBackend(engine, max_batch=8)
    with pytest.raises(BackendError, match=r"m.plan: CUDA could not set up the engine's buffers \(CUDA error 35 "):
        backend.load()
    assert backend._context is None and backend._engine is None and backend._stream is None
    assert not backend.loaded


def test_pybind11_signatures_are_read_from_docstrings_and_what_python_cannot_express_is_left_out():
    """Docstrings as pybind11 writes them (fakes: the parsing alone)."""
    from harness.nvidia_bindings import signatures

    def method():
        """set_shape(*args, **kwargs)
        Overloaded function.

        1. set_shape(self: tensorrt.IOptimizationProfile, input: str, /, min: tensorrt.Dims, opt: tensorrt.Dims = <Dims: (1)>) -> None

        2. set_shape(self: tensorrt.IOptimizationProfile, in: str) -> tensorrt.tensorrt.ITensor
        """

    import inspect

    # what Python sees of a pybind11 overload set: (*args, **kwargs), which says nothing
    method.__signature__ = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                                              inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    (signature, returns), = signatures(method, "set_shape", bound=True)
    assert str(signature) == "(input, min, opt=None)" and returns == "None"
    signature.bind(None, None)
    with pytest.raises(TypeError):
        signature.bind(None, None, None, None)


def test_a_folder_without_bindings_is_one_line_not_the_childs_traceback(tmp_path):
    import subprocess

    from harness.nvidia_bindings import BindingsError

    with pytest.raises(BindingsError, match=f"^{tmp_path}: no TensorRT bindings in it "):
        check(tmp_path)
    done = subprocess.run([sys.executable, "-m", "harness.nvidia_bindings", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
