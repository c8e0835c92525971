"""What artifacts record and when they are current: ONNX parents, engine metadata, the plan's paths."""

from __future__ import annotations

import enum
from pathlib import Path

import onnx
import pytest

from runtime.artifacts import (
    SOURCE_DIGEST,
    WEIGHTS_DIGEST,
    ArtifactPlan,
    EngineSpec,
    derived_onnx_path,
    engine_metadata_path,
    engine_status,
    onnx_metadata,
    onnx_staleness,
    read_metadata,
    sha256_file,
    write_metadata,
)
from runtime.cuda import cuda_call

# Fakes for the decision logic only: no TensorRT or GPU is involved in engine_status with a host dict.
HOST = {"tensorrt_version": "10.13.3", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
SPEC = EngineSpec("fp32", min_batch=1, opt_batch=32, max_batch=32)


def fake_engine(tmp_path: Path, onnx_path: Path, **changes) -> Path:
    """A stand-in engine file with metadata as export.engine.make_engine writes it, for HOST and `onnx_path`."""
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not a real plan")
    metadata = {
        **HOST,
        "onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine),
        "precision": "fp32",
        "profile": {"min": 1, "opt": 32, "max": 64},
        "workspace_mib": 2048,
        "verified": True,
        **changes,
    }
    write_metadata(engine, metadata)
    return engine


def with_metadata(source: Path, out: Path, **props) -> Path:
    model = onnx.load(str(source))
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


def test_metadata_round_trip_and_unreadable_metadata(tmp_path):
    engine = tmp_path / "a.plan"
    assert read_metadata(engine) is None
    metadata = {"precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 64}}
    assert write_metadata(engine, metadata) == engine_metadata_path(engine) == tmp_path / "a.plan.json"
    assert read_metadata(engine) == metadata
    engine_metadata_path(engine).write_text("{not json")
    assert read_metadata(engine) is None
    engine_metadata_path(engine).write_text("[1, 2]")
    assert read_metadata(engine) is None


def test_a_verified_engine_of_this_onnx_and_host_is_current(tmp_path, tiny_onnx):
    ok, reason = engine_status(fake_engine(tmp_path, tiny_onnx), tiny_onnx, SPEC, host=HOST)
    assert ok, reason
    assert "fp32, batch 1..64" in reason and "NVIDIA L4" in reason


@pytest.mark.parametrize(
    ("changes", "host", "spec", "expected"),
    [
        ({"onnx_sha256": "0" * 64}, HOST, SPEC, "changed since the engine was built"),
        ({}, {**HOST, "tensorrt_version": "11.0.0"}, SPEC, "TensorRT 10.13.3, this host has 11.0.0"),
        ({}, {**HOST, "gpu_name": "NVIDIA H100"}, SPEC, "GPU NVIDIA L4, this host has NVIDIA H100"),
        ({}, {**HOST, "compute_capability": "9.0"}, SPEC, "compute capability 8.9, this host has 9.0"),
        ({}, HOST, EngineSpec("fp16", 1, 32, 32), "is fp32, fp16 was asked for"),
        ({}, HOST, EngineSpec("fp32", 1, 32, 128), "takes batches 1..64, 1..128 was asked for"),
        # A profile that starts above 1 is stale too: the service sends batches of 1.
        ({"profile": {"min": 4, "opt": 32, "max": 64}}, HOST, SPEC, "takes batches 4..64, 1..32 was asked for"),
        ({"engine_sha256": "0" * 64}, HOST, SPEC, "not the engine its metadata describes"),
        ({"profile": {"max": 64}}, HOST, SPEC, "no valid profile"),
        ({"verified": False}, HOST, SPEC, "did not pass its verification"),
    ],
)
def test_a_stale_engine_says_why(tmp_path, tiny_onnx, changes, host, spec, expected):
    ok, reason = engine_status(fake_engine(tmp_path, tiny_onnx, **changes), tiny_onnx, spec, host=host)
    assert not ok
    assert expected in reason


def test_another_opt_batch_is_no_reason_to_rebuild(tmp_path, tiny_onnx):
    engine = fake_engine(tmp_path, tiny_onnx, profile={"min": 1, "opt": 8, "max": 64})
    assert engine_status(engine, tiny_onnx, EngineSpec("fp32", 1, 32, 32), host=HOST)[0]


def test_missing_engine_metadata_or_onnx(tmp_path, tiny_onnx):
    engine = tmp_path / "model.plan"
    assert engine_status(engine, tiny_onnx, host=HOST) == (False, f"{engine}: no engine file")
    engine = fake_engine(tmp_path, tiny_onnx)
    assert "no such ONNX file" in engine_status(engine, tmp_path / "gone.onnx", host=HOST)[1]
    metadata = read_metadata(engine)
    del metadata["gpu_name"]
    write_metadata(engine, metadata)
    assert "lacks gpu_name" in engine_status(engine, tiny_onnx, host=HOST)[1]
    engine_metadata_path(engine).unlink()
    assert "missing or unreadable" in engine_status(engine, tiny_onnx, host=HOST)[1]


def test_without_a_host_dict_tensorrt_is_asked(tmp_path, tiny_onnx):
    from runtime.cuda import tensorrt_status

    ok, why = tensorrt_status()
    if ok:
        pytest.skip("TensorRT and a GPU are present here")
    ok, reason = engine_status(fake_engine(tmp_path, tiny_onnx), tiny_onnx, SPEC)
    assert not ok and reason.endswith(why) and "cannot check" in reason


def test_onnx_staleness_follows_the_recorded_parent(tmp_path, tiny_onnx):
    weights = tmp_path / "w.pdparams"
    weights.write_bytes(b"weights")
    current = with_metadata(tiny_onnx, tmp_path / "current.onnx", **{WEIGHTS_DIGEST: sha256_file(weights)})
    assert onnx_metadata(current) == {WEIGHTS_DIGEST: sha256_file(weights)}
    assert onnx_staleness(current, weights) is None
    other = with_metadata(tiny_onnx, tmp_path / "other.onnx", **{WEIGHTS_DIGEST: "0" * 64})
    assert onnx_staleness(other, weights) == f"{other} was made from another weights file than {weights}"
    assert onnx_staleness(tmp_path / "none.onnx", weights) == f"{tmp_path / 'none.onnx'} is missing"
    # Brought by a user (no digest), or shipped without its weights: used as it is.
    assert onnx_staleness(with_metadata(tiny_onnx, tmp_path / "own.onnx"), weights) is None
    assert onnx_staleness(other, tmp_path / "no-weights.pdparams") is None
    derived = with_metadata(tiny_onnx, tmp_path / "d.onnx", **{SOURCE_DIGEST: "0" * 64})
    assert "made from another ONNX than" in onnx_staleness(derived, current, SOURCE_DIGEST)
    # cut short (a crash while copying it in): made again, not a traceback at start
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(current.read_bytes()[:100])
    assert onnx_staleness(cut, weights).startswith(f"{cut}: not an ONNX file ONNX Runtime loads")
    with pytest.raises(ValueError, match="none.onnx: no such ONNX file"):
        onnx_metadata(tmp_path / "none.onnx")


def test_engine_spec_problems():
    assert EngineSpec().problem() is None
    assert "precision must be one of fp32, fp16, int8" in EngineSpec("bf16").problem()
    assert "1 <= min <= opt <= max" in EngineSpec(min_batch=0).problem()
    assert "1 <= min <= opt <= max" in EngineSpec(min_batch=1, opt_batch=64, max_batch=32).problem()
    assert "at least 1 MiB" in EngineSpec(workspace_mib=0).problem()


def test_the_plan_names_each_precisions_files():
    assert derived_onnx_path("build/m.onnx", "fp32") == Path("build/m.onnx")
    assert derived_onnx_path("build/m.onnx", "int8") == Path("build/m.int8.onnx")
    plan = ArtifactPlan("tensorrt", "fp16", Path("w"), Path("a/m.onnx"), engine=Path("e/m.fp16.plan"))
    assert (plan.onnx_for_precision, plan.served) == (Path("a/m.fp16.onnx"), Path("e/m.fp16.plan"))
    plan = ArtifactPlan("onnxruntime", "int8", Path("w"), Path("a/m.onnx"))
    assert plan.served == Path("a/m.int8.onnx")


def test_cuda_call():
    class Err(enum.IntEnum):  # stands in for cuda-python's cudaError_t
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    assert cuda_call((Err.cudaSuccess,)) is None
    assert cuda_call((Err.cudaSuccess, 7)) == 7
    assert cuda_call((Err.cudaSuccess, 7, 8)) == (7, 8)
    with pytest.raises(RuntimeError, match="CUDA error 2 \\(cudaErrorMemoryAllocation\\)"):
        cuda_call((Err.cudaErrorMemoryAllocation, 0))
