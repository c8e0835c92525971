"""Engine builds: argument checks, the timing cache, build-verify-record, fp16 conversion, and (on a GPU)
real engines."""

from __future__ import annotations

import enum
import importlib.util
import json
import re

import numpy as np
import pytest

import export.engine
from export.engine import build_engine, load_timing_cache, make_engine, strongly_typed_flags
from export.errors import ExportError
from export.fp16 import convert_fp16
from model.spec import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from runtime.artifacts import EngineSpec, derived_onnx_path, engine_metadata_path, engine_status, read_metadata
from runtime.cuda import tensorrt_status
from tests.conftest import images, run_onnx

TRT_OK, TRT_REASON = tensorrt_status()
TRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None
gpu = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"precision": "bf16"}, "precision must be one of fp32, fp16, int8"),
        ({"min_batch": 0}, "1 <= min <= opt <= max"),
        ({"min_batch": 8, "opt_batch": 4}, "1 <= min <= opt <= max"),
        ({"opt_batch": 64, "max_batch": 32}, "1 <= min <= opt <= max"),
        ({"workspace_mib": 0}, "at least 1 MiB"),
        ({"precision": "fp16"}, "is an fp32 model, not fp16"),
    ],
)
def test_build_engine_rejects_bad_arguments(tmp_path, tiny_onnx, kwargs, expected):
    with pytest.raises(ExportError, match=expected):
        build_engine(tiny_onnx, tmp_path / "model.plan", EngineSpec(**{"precision": "fp32", **kwargs}))
    assert not (tmp_path / "model.plan").exists()


def test_build_engine_rejects_missing_onnx_and_wrong_precision(tmp_path, tiny_onnx):
    with pytest.raises(ExportError, match="no such ONNX file"):
        build_engine(tmp_path / "gone.onnx", tmp_path / "model.plan", EngineSpec())
    fp16 = convert_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx")
    with pytest.raises(ExportError, match="is an fp16 model, not fp32"):
        build_engine(fp16, tmp_path / "model.plan", EngineSpec("fp32"))


@pytest.mark.skipif(TRT_INSTALLED, reason="TensorRT is installed here")
def test_tensorrt_unavailable_here(tmp_path, tiny_onnx):
    ok, reason = tensorrt_status()
    assert not ok and "TensorRT is not installed" in reason
    with pytest.raises(ExportError, match="cannot build a TensorRT engine: TensorRT is not installed"):
        build_engine(tiny_onnx, tmp_path / "model.plan", EngineSpec())


@pytest.fixture
def fake_build(monkeypatch):
    """A stand-in for build_engine (TensorRT is not here; the logic around it is what is tested):
    writes bytes where it is told and returns metadata as the real one does."""
    def build(onnx_path, engine_path, spec, timing_cache=None, progress=True):
        engine_path.write_bytes(b"new engine")
        return {"precision": spec.precision, "engine_sha256": "new", "verified": False}

    monkeypatch.setattr(export.engine, "build_engine", build)


def test_an_engine_is_recorded_as_usable_only_after_its_check(tmp_path, tiny_onnx, fake_build):
    engine = tmp_path / "model.plan"
    seen = []

    def passes(path):
        seen.append((path.name, read_metadata(engine)))
        return {"max_abs_diff": 0.0}

    metadata = make_engine(tiny_onnx, engine, EngineSpec(), passes)
    # The check saw the unverified build under another name, with no metadata for it yet.
    assert len(seen) == 1 and re.fullmatch(r"\.model\.plan\.[0-9a-f]{12}\.unverified", seen[0][0])
    assert seen[0][1] is None
    assert engine.read_bytes() == b"new engine"
    assert read_metadata(engine) == metadata and metadata["verified"] is True
    assert metadata["verification"] == {"max_abs_diff": 0.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan", "model.plan.json", "tiny.onnx"]


def test_an_engine_that_fails_its_check_leaves_the_previous_one_and_nothing_else(tmp_path, tiny_onnx, fake_build):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"old engine")
    engine_metadata_path(engine).write_text(json.dumps({"verified": True, "engine_sha256": "old"}))

    def fails(path):
        raise ExportError("reference check failed: the top-1 class of 3 of 16 reference images changed")

    with pytest.raises(ExportError, match="reference check failed"):
        make_engine(tiny_onnx, engine, EngineSpec(), fails)
    assert engine.read_bytes() == b"old engine" and read_metadata(engine)["engine_sha256"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan", "model.plan.json", "tiny.onnx"]


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


def test_convert_fp16(tmp_path, tiny_onnx):
    import onnx

    out = convert_fp16(tiny_onnx, derived_onnx_path(tiny_onnx, "fp16"))
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
    with pytest.raises(ExportError, match="an fp16 or int8 ONNX, made from another"):  # its metadata says so
        convert_fp16(fp16, tmp_path / "twice.onnx")
    import onnx

    model = onnx.load(str(fp16))
    del model.metadata_props[:]  # an fp16 file that says nothing of its source
    onnx.save(model, str(tmp_path / "anonymous.onnx"))
    with pytest.raises(ExportError, match="cannot convert to fp16"):
        convert_fp16(tmp_path / "anonymous.onnx", tmp_path / "twice.onnx")


def test_tensorrt_backend_imports_without_tensorrt(tmp_path):
    from runtime.backend import BackendError
    from runtime.tensorrt import TensorRTBackend

    backend = TensorRTBackend(tmp_path / "model.plan", max_batch=8)
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
    from runtime.tensorrt import TensorRTBackend

    source = tiny_onnx if precision == "fp32" else convert_fp16(tiny_onnx, derived_onnx_path(tiny_onnx, precision))
    engine, cache = tmp_path / f"tiny.{precision}.plan", tmp_path / "timing.cache"
    spec = EngineSpec(precision, min_batch=1, opt_batch=4, max_batch=8, workspace_mib=256)
    batch = images(5)
    reference = run_onnx(tiny_onnx, batch)

    def check(path):
        with TensorRTBackend(path) as backend:
            logits = backend.infer(batch)
        np.testing.assert_allclose(logits, reference, atol=2e-2 if precision == "fp16" else 5e-3, rtol=1e-2)
        return {}

    metadata = make_engine(source, engine, spec, check, timing_cache=cache, progress=False)
    assert cache.is_file() and metadata["precision"] == precision
    assert metadata["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert engine_status(engine, source, spec)[0]  # against the real host
    with TensorRTBackend(engine, max_batch=8) as backend:
        for n in (1, 5):
            logits = backend.infer(batch[:n])
            assert logits.dtype == np.float32 and logits.shape == (n, NUM_CLASSES)
            # TF32 is off (fp32 engines); fp16 arithmetic stays well within these bounds on this model.
            np.testing.assert_allclose(logits, reference[:n], atol=2e-2 if precision == "fp16" else 5e-3, rtol=1e-2)


@gpu
@pytest.mark.gpu
def test_tensorrt_backend_refuses_a_too_small_profile(tmp_path, tiny_onnx):
    from runtime.backend import BackendError
    from runtime.tensorrt import TensorRTBackend

    engine = tmp_path / "tiny.plan"
    build_engine(tiny_onnx, engine, EngineSpec("fp32", 1, 2, 4, 256), progress=False)
    with pytest.raises(BackendError, match="takes batches 1..4"):
        TensorRTBackend(engine, max_batch=8).load()
    with TensorRTBackend(engine) as backend:  # no max_batch: the profile's
        assert backend.max_batch == 4
