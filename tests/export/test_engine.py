"""Engine metadata and staleness, argument checks, fp16 conversion, and (on a GPU) real engines."""

from __future__ import annotations

import enum
import importlib.util

import numpy as np
import pytest

from export.engine import (
    build_engine,
    cuda_call,
    engine_metadata_path,
    engine_status,
    ensure_engine,
    load_timing_cache,
    read_metadata,
    sha256_file,
    strongly_typed_flags,
    tensorrt_status,
    write_metadata,
)
from export.errors import ExportError
from export.fp16 import convert_fp16, fp16_onnx_path
from model.spec import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from tests.export.conftest import images, run_onnx

TRT_OK, TRT_REASON = tensorrt_status()
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
gpu = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")

# Fakes for the decision logic only: no TensorRT or GPU is involved in engine_status with a host dict.
HOST = {"tensorrt_version": "10.13.3", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}


def fake_engine(tmp_path, onnx_path, **changes):
    """A stand-in engine file with metadata as build_engine writes it, for HOST and `onnx_path`."""
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real plan")
    metadata = {
        **HOST,
        "onnx_sha256": sha256_file(onnx_path),
        "source_onnx_sha256": None,
        "engine_sha256": sha256_file(engine),
        "precision": "fp32",
        "profile": {"min": 1, "opt": 32, "max": 256},
        "workspace_mib": 2048,
        "build_seconds": 1.0,
        "built_at": "2026-01-01T00:00:00+00:00",
        **changes,
    }
    write_metadata(engine, metadata)
    return engine


def test_metadata_round_trip(tmp_path):
    engine = tmp_path / "a.engine"
    metadata = {"precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 64}, "gpu_name": "X"}
    assert write_metadata(engine, metadata) == engine_metadata_path(engine) == tmp_path / "a.engine.json"
    assert read_metadata(engine) == metadata


def test_read_metadata_missing_or_corrupt(tmp_path):
    engine = tmp_path / "a.engine"
    assert read_metadata(engine) is None
    engine_metadata_path(engine).write_text("{not json")
    assert read_metadata(engine) is None
    engine_metadata_path(engine).write_text("[1, 2]")
    assert read_metadata(engine) is None


def test_usable_engine(tmp_path, tiny_onnx):
    engine = fake_engine(tmp_path, tiny_onnx)
    ok, reason = engine_status(engine, tiny_onnx, host=HOST, precision="fp32", max_batch=256)
    assert ok, reason
    assert "fp32" in reason and "NVIDIA L4" in reason


def test_fp16_engine_is_judged_against_its_fp32_source(tmp_path, tiny_onnx):
    # The fp16 ONNX is what TensorRT parsed; the service is given the fp32 file it came from.
    engine = fake_engine(tmp_path, tiny_onnx, onnx_sha256="0" * 64, source_onnx_sha256=sha256_file(tiny_onnx),
                         precision="fp16")
    assert engine_status(engine, tiny_onnx, host=HOST, precision="fp16")[0]


@pytest.mark.parametrize(
    ("changes", "host", "kwargs", "expected"),
    [
        ({"onnx_sha256": "0" * 64}, HOST, {}, "changed since the engine was built"),
        ({"source_onnx_sha256": "0" * 64}, HOST, {}, "changed since the engine was built"),
        ({}, {**HOST, "tensorrt_version": "11.0.0"}, {}, "TensorRT 10.13.3, this host has 11.0.0"),
        ({}, {**HOST, "gpu_name": "NVIDIA H100"}, {}, "GPU NVIDIA L4, this host has NVIDIA H100"),
        ({}, {**HOST, "compute_capability": "9.0"}, {}, "compute capability 8.9, this host has 9.0"),
        ({}, HOST, {"precision": "fp16"}, "is fp32, fp16 was asked for"),
        ({"profile": {"min": 1, "opt": 8, "max": 64}}, HOST, {"max_batch": 128}, "batches up to 64, 128 was asked"),
        ({"engine_sha256": "0" * 64}, HOST, {}, "not the engine its metadata describes"),
        ({"profile": {"max": 64}}, HOST, {}, "no valid profile"),
    ],
)
def test_stale_engine(tmp_path, tiny_onnx, changes, host, kwargs, expected):
    engine = fake_engine(tmp_path, tiny_onnx, **changes)
    ok, reason = engine_status(engine, tiny_onnx, host=host, **kwargs)
    assert not ok
    assert expected in reason


def test_stale_without_engine_metadata_or_onnx(tmp_path, tiny_onnx):
    engine = tmp_path / "model.engine"
    assert engine_status(engine, tiny_onnx, host=HOST) == (False, f"{engine}: no engine file")
    engine = fake_engine(tmp_path, tiny_onnx)
    assert "no such ONNX file" in engine_status(engine, tmp_path / "gone.onnx", host=HOST)[1]
    metadata = read_metadata(engine)
    del metadata["gpu_name"]
    write_metadata(engine, metadata)
    assert "lacks gpu_name" in engine_status(engine, tiny_onnx, host=HOST)[1]
    engine_metadata_path(engine).write_text("{broken")
    assert "missing or unreadable" in engine_status(engine, tiny_onnx, host=HOST)[1]
    engine_metadata_path(engine).unlink()
    assert "missing or unreadable" in engine_status(engine, tiny_onnx, host=HOST)[1]


def test_ensure_engine_refuses_with_the_reason(tmp_path, tiny_onnx):
    with pytest.raises(ExportError, match="no engine file.*rebuild"):
        ensure_engine(tiny_onnx, tmp_path / "model.engine", rebuild=False)
    engine = fake_engine(tmp_path, tiny_onnx)
    with pytest.raises(ExportError, match="GPU NVIDIA L4, this host has NVIDIA H100"):
        ensure_engine(tiny_onnx, engine, host={**HOST, "gpu_name": "NVIDIA H100"}, rebuild=False)
    assert ensure_engine(tiny_onnx, engine, host=HOST, rebuild=False)[0] == engine


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"precision": "int8"}, "precision must be one of fp32, fp16"),
        ({"min_batch": 0}, "1 <= min <= opt <= max"),
        ({"min_batch": 8, "opt_batch": 4}, "1 <= min <= opt <= max"),
        ({"opt_batch": 64, "max_batch": 32}, "1 <= min <= opt <= max"),
        ({"workspace_mib": 0}, "at least 1 MiB"),
        ({"precision": "fp16"}, "is an fp32 model, not fp16"),
    ],
)
def test_build_engine_rejects_bad_arguments(tmp_path, tiny_onnx, kwargs, expected):
    with pytest.raises(ExportError, match=expected):
        build_engine(tiny_onnx, tmp_path / "model.engine", **kwargs)
    assert not (tmp_path / "model.engine").exists()


def test_build_engine_rejects_missing_onnx_and_wrong_fp32(tmp_path, tiny_onnx):
    with pytest.raises(ExportError, match="no such ONNX file"):
        build_engine(tmp_path / "gone.onnx", tmp_path / "model.engine")
    fp16 = convert_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    with pytest.raises(ExportError, match="is an fp16 model, not fp32"):
        build_engine(fp16, tmp_path / "model.engine", precision="fp32")


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_tensorrt_unavailable_here(tmp_path, tiny_onnx):
    ok, reason = tensorrt_status()
    assert not ok and "TensorRT is not installed" in reason
    with pytest.raises(ExportError, match="cannot build a TensorRT engine: TensorRT is not installed"):
        build_engine(tiny_onnx, tmp_path / "model.engine")
    ok, reason = engine_status(fake_engine(tmp_path, tiny_onnx), tiny_onnx)  # no host dict: must ask TensorRT
    assert not ok and "cannot check" in reason


def test_cuda_call():
    class Err(enum.IntEnum):  # stands in for cuda-python's cudaError_t
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    assert cuda_call((Err.cudaSuccess,)) is None
    assert cuda_call((Err.cudaSuccess, 7)) == 7
    assert cuda_call((Err.cudaSuccess, 7, 8)) == (7, 8)
    with pytest.raises(RuntimeError, match="CUDA error 2 \\(cudaErrorMemoryAllocation\\)"):
        cuda_call((Err.cudaErrorMemoryAllocation, 0))


class FakeBuilderConfig:
    """Stands in for IBuilderConfig's timing-cache calls (the logic around them is what is tested):
    create_timing_cache returns None for bytes it cannot read, set_timing_cache False for a cache
    from another device, as the bindings document."""

    def __init__(self, readable: bool = True, matches: bool = True):
        self.readable, self.matches, self.installed = readable, matches, []

    def create_timing_cache(self, data: bytes):
        return ("cache", data) if self.readable or not data else None

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("incompatible function arguments")
        assert ignore_mismatch is False
        ok = self.matches or cache == ("cache", b"")
        if ok:
            self.installed.append(cache)
        return ok


@pytest.mark.parametrize("readable, matches, expected", [
    (True, True, ("cache", b"timings")),  # reused
    (False, True, ("cache", b"")),  # corrupt file: start afresh
    (True, False, ("cache", b"")),  # another GPU or version: start afresh
])
def test_timing_cache_is_reused_or_started_afresh(tmp_path, readable, matches, expected):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"timings")
    config = FakeBuilderConfig(readable, matches)
    load_timing_cache(config, path)
    assert config.installed == [expected]


def test_strongly_typed_flag_where_tensorrt_has_it():
    class WithFlag(enum.IntEnum):  # stands in for trt.NetworkDefinitionCreationFlag
        PREFER_AOT_PYTHON_PLUGINS = 1
        STRONGLY_TYPED = 2

    class Without(enum.IntEnum):
        PREFER_AOT_PYTHON_PLUGINS = 1

    class FakeTensorRT:
        NetworkDefinitionCreationFlag = WithFlag

    assert strongly_typed_flags(FakeTensorRT) == 1 << 2
    FakeTensorRT.NetworkDefinitionCreationFlag = Without
    assert strongly_typed_flags(FakeTensorRT) == 0


def test_fp16_onnx_path():
    assert str(fp16_onnx_path("build/alexnet_acmix.onnx")) == "build/alexnet_acmix.fp16.onnx"


def test_convert_fp16(tmp_path, tiny_onnx):
    import onnx

    out = convert_fp16(tiny_onnx, fp16_onnx_path(tiny_onnx))
    model = onnx.load(str(out))
    float_type = onnx.TensorProto.FLOAT
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [float_type] * 2
    assert [v.name for v in model.graph.input] == [INPUT_NAME]
    assert [v.name for v in model.graph.output] == [OUTPUT_NAME]
    weights = {init.name: init.data_type for init in model.graph.initializer}
    assert weights["conv_w"] == weights["mask"] == weights["fc_w"] == onnx.TensorProto.FLOAT16
    mask = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "mask"))
    assert mask.min() == np.float16(-1e4)  # the masking constant survives, finite

    batch = images(4)
    reference, half = run_onnx(tiny_onnx, batch), run_onnx(out, batch)
    assert half.dtype == np.float32 and half.shape == (4, NUM_CLASSES)
    assert np.isfinite(half).all()
    np.testing.assert_allclose(half, reference, atol=1e-2, rtol=1e-2)


def test_convert_fp16_errors(tmp_path, tiny_onnx):
    with pytest.raises(ExportError, match="no such ONNX file"):
        convert_fp16(tmp_path / "gone.onnx", tmp_path / "out.onnx")
    fp16 = convert_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    with pytest.raises(ExportError, match="cannot convert to fp16"):
        convert_fp16(fp16, tmp_path / "twice.onnx")


def test_tensorrt_backend_imports_without_tensorrt(tmp_path):
    from service.backends.base import BackendError
    from service.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend(tmp_path / "model.engine", max_batch=8)
    assert backend.name == "tensorrt" and backend.max_batch == 8 and not backend.loaded
    if TRT_INSTALLED:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendError, match="needs tensorrt and cuda-python"):
        backend.load()
    assert not backend.loaded


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime(tmp_path, tiny_onnx, precision):
    from service.backends.tensorrt import TensorRTBackend

    engine = tmp_path / f"tiny.{precision}.engine"
    cache = tmp_path / "timing.cache"
    path, what = ensure_engine(tiny_onnx, engine, precision, min_batch=1, opt_batch=4, max_batch=8,
                               workspace_mib=256, timing_cache=cache, rebuild=True, progress=False)
    assert path == engine and what.startswith("built") and cache.is_file()
    metadata = read_metadata(engine)
    assert metadata["precision"] == precision and metadata["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert engine_status(engine, tiny_onnx, precision=precision, max_batch=8)[0]  # against the real host
    assert ensure_engine(tiny_onnx, engine, precision, max_batch=8)[1] == engine_status(engine, tiny_onnx)[1]

    batch = images(5)
    reference = run_onnx(tiny_onnx, batch)
    with TensorRTBackend(engine, max_batch=8) as backend:
        for n in (1, 5):
            logits = backend.infer(batch[:n])
            assert logits.dtype == np.float32 and logits.shape == (n, NUM_CLASSES)
            # TF32 (fp32 engines) and fp16 arithmetic both stay well within these bounds on this model.
            np.testing.assert_allclose(logits, reference[:n], atol=2e-2 if precision == "fp16" else 5e-3, rtol=1e-2)


@gpu
@pytest.mark.gpu
def test_tensorrt_backend_refuses_a_too_small_profile(tmp_path, tiny_onnx):
    from service.backends.base import BackendError
    from service.backends.tensorrt import TensorRTBackend

    engine = tmp_path / "tiny.engine"
    build_engine(tiny_onnx, engine, min_batch=1, opt_batch=2, max_batch=4, workspace_mib=256, progress=False)
    with pytest.raises(BackendError, match="takes batches 1..4"):
        TensorRTBackend(engine, max_batch=8).load()

