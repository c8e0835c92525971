"""service.backends.create_backend: the plan's artifact, on a backend that can run its precision."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.artifacts import ArtifactPlan
from runtime.backend import BackendError
from runtime.cpu import describe
from service.backends import create_backend
from service.settings import Settings


@pytest.mark.parametrize("max_batch, chunks", [(32, ", feature layers in chunks of 16 images"), (16, "")])
def test_the_plan_of_the_settings_loads_on_onnx_runtime(onnx_model, max_batch, chunks):
    plan = Settings(backend="onnxruntime", onnx_path=str(onnx_model)).plan()
    backend = create_backend(plan, max_batch=max_batch, threads=1)
    assert backend.name == "onnxruntime" and backend.onnx_path == Path(onnx_model)
    with backend:
        # which kernels run: the CPU's extensions (runtime/cpu.py), the threads and the graph's chunks
        # (runtime/batch_chunks.py), for /readyz and the log; no chunks where no batch can hold two
        assert backend.description == (f"{onnx_model} on CPUExecutionProvider (1 thread per batch{chunks}; "
                                       f"{describe()})")
        assert backend.session.batch_chunk == (16 if chunks else None)


def test_a_missing_artifact_names_how_to_make_it(tmp_path):
    plan = ArtifactPlan("onnxruntime", "int8", Path("w"), tmp_path / "m.onnx")
    with pytest.raises(BackendError, match=r"m.int8.onnx is missing; `python -m service` makes it at start"):
        create_backend(plan, max_batch=4)


def test_fp16_on_onnx_runtime_without_a_gpu_is_refused_with_the_reason(tmp_path):
    (tmp_path / "m.fp16.onnx").write_bytes(b"x")
    plan = ArtifactPlan("onnxruntime", "fp16", Path("w"), tmp_path / "m.onnx")
    with pytest.raises(BackendError, match="precision fp16: ONNX Runtime runs fp16 on the CPU slower than fp32"):
        create_backend(plan, max_batch=4)


def test_the_engine_path_follows_the_precision_and_the_engine_dir():
    settings = Settings(backend="tensorrt", precision="fp16", onnx_path="/app/artifacts/alexnet_acmix.onnx",
                        engine_dir="/engines", max_batch_size=16)
    plan = settings.plan()
    assert plan.engine == Path("/engines/alexnet_acmix.fp16.plan") == plan.served
    assert plan.timing_cache == Path("/engines/timing.cache")
    assert (plan.engine_spec.min_batch, plan.engine_spec.opt_batch, plan.engine_spec.max_batch) == (1, 16, 16)
    assert plan.onnx_for_precision == Path("/app/artifacts/alexnet_acmix.fp16.onnx")
    assert Settings(backend="tensorrt", engine_path="/x/e.plan").plan().engine == Path("/x/e.plan")
    assert Settings(backend="onnxruntime").plan().engine is None
