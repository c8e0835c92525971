"""The Triton model repository: layout, config.pbtxt against the real ONNX, the plan branch, the CLI."""

from __future__ import annotations

import json

import onnx
import pytest
from google.protobuf import text_format

from export.__main__ import main
from export.errors import ExportError
from export.triton import model_config_pb2, read_model_config, write_model_repository
from model.spec import INPUT_NAME, OUTPUT_NAME
from runtime.artifacts import sha256_file, write_metadata

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def fake_engine(tmp_path, onnx_path, profile=None, **changes):
    """A fake engine file, not a real TensorRT plan: only the repository's layout logic reads it.

    Its metadata is what export.engine.make_engine writes, for an engine built from `onnx_path`.
    """
    engine = tmp_path / "alexnet_acmix.fp32.plan"
    engine.write_bytes(b"not a real plan")
    write_metadata(engine, {
        "tensorrt_version": "11.2.1", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
        "onnx_sha256": sha256_file(onnx_path), "engine_sha256": sha256_file(engine), "precision": "fp32",
        "verified": True,
        "profile": profile or {"min": 1, "opt": 16, "max": 64}, **changes,
    })
    return engine


def parse_config(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2().ModelConfig())


def onnx_tensors(values):
    """name -> (Triton data type, dims without the batch dimension), read from the ONNX graph."""
    return {v.name: (ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                     [d.dim_value for d in v.type.tensor_type.shape.dim][1:]) for v in values}


def test_onnx_repository_layout(tmp_path, onnx_model):
    model_dir = write_model_repository(tmp_path / "repo", onnx_model)
    assert model_dir == tmp_path / "repo" / "alexnet_acmix"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()

    config = parse_config(model_dir)
    assert config.name == "alexnet_acmix"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.count == 1 and group.kind == model_config_pb2().ModelInstanceGroup.KIND_CPU
    assert read_model_config(model_dir) == config


def test_config_matches_the_onnx_inputs_and_outputs(tmp_path, onnx_model):
    config = parse_config(write_model_repository(tmp_path, onnx_model))
    graph = onnx.load(str(onnx_model)).graph
    initializers = {init.name for init in graph.initializer}
    pb2 = model_config_pb2()

    def described(tensors):
        return {t.name: (pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors}

    assert described(config.input) == onnx_tensors(v for v in graph.input if v.name not in initializers)
    assert described(config.output) == onnx_tensors(graph.output)
    assert described(config.input) == {INPUT_NAME: ("TYPE_FP32", [3, 128, 128])}
    assert described(config.output) == {OUTPUT_NAME: ("TYPE_FP32", [10])}
    assert config.output[0].label_filename == "labels.txt"


def test_labels_are_the_cifar10_classes_in_class_id_order(tmp_path, onnx_model):
    model_dir = write_model_repository(tmp_path, onnx_model)
    assert (model_dir / "labels.txt").read_text().splitlines() == CIFAR10


def test_options_reach_the_config(tmp_path, onnx_model):
    model_dir = write_model_repository(tmp_path, onnx_model, model_name="acmix", max_batch_size=8,
                                       queue_delay_us=250, instances=3, kind="gpu")
    assert model_dir.name == "acmix"
    config = parse_config(model_dir)
    assert (config.name, config.max_batch_size) == ("acmix", 8)
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.instance_group[0].count == 3
    assert config.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_GPU


def test_plan_with_metadata(tmp_path, onnx_model):
    engine = fake_engine(tmp_path, onnx_model)
    model_dir = write_model_repository(tmp_path / "repo", onnx_model, engine_path=engine, max_batch_size=64)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.plan"]
    assert (model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    config = parse_config(model_dir)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 64
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 64]  # the profile's opt, and the max
    assert config.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_GPU
    assert [t.name for t in config.input] == [INPUT_NAME] and [t.name for t in config.output] == [OUTPUT_NAME]

    cpu = parse_config(write_model_repository(tmp_path / "cpu", onnx_model, engine_path=engine, kind="KIND_CPU"))
    assert cpu.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_CPU


def test_max_batch_size_above_the_engine_profile(tmp_path, onnx_model):
    engine = fake_engine(tmp_path, onnx_model, profile={"min": 1, "opt": 16, "max": 64})
    with pytest.raises(ExportError, match="max batch size 65 exceeds the engine's profile max 64"):
        write_model_repository(tmp_path / "repo", onnx_model, engine_path=engine, max_batch_size=65)
    assert not (tmp_path / "repo").exists()


def test_engine_problems(tmp_path, onnx_model):
    stale = fake_engine(tmp_path, onnx_model, onnx_sha256="0" * 64)
    with pytest.raises(ExportError, match="changed since the engine was built"):
        write_model_repository(tmp_path / "repo", onnx_model, engine_path=stale)
    from_two = fake_engine(tmp_path, onnx_model, profile={"min": 2, "opt": 16, "max": 64})
    with pytest.raises(ExportError, match="Triton sends batches from 1"):
        write_model_repository(tmp_path / "repo", onnx_model, engine_path=from_two)


def test_engine_without_metadata_or_missing_gives_the_onnx(tmp_path, onnx_model, capsys):
    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"no metadata beside it")
    for engine in (bare, tmp_path / "missing.plan", None):
        config = parse_config(write_model_repository(tmp_path / "repo", onnx_model, engine_path=engine))
        assert config.platform == "onnxruntime_onnx"
    assert "no engine metadata" in capsys.readouterr().err


def test_rewriting_for_the_other_platform_keeps_one_model_file(tmp_path, onnx_model):
    write_model_repository(tmp_path, onnx_model)
    model_dir = write_model_repository(tmp_path, onnx_model, engine_path=fake_engine(tmp_path, onnx_model))
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.plan"]


@pytest.mark.parametrize("options, message", [
    ({"max_batch_size": 0}, "max batch size must be at least 1"),
    ({"queue_delay_us": -1}, "queue delay"),
    ({"instances": 0}, "instance count"),
    ({"kind": "tpu"}, "instance kind"),
    ({"model_name": "../x"}, "model name"),
])
def test_bad_options(tmp_path, onnx_model, options, message):
    with pytest.raises(ExportError, match=message):
        write_model_repository(tmp_path, onnx_model, **options)


def test_onnx_with_another_contract(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ExportError, match="inputs are \\['x'\\]"):
        write_model_repository(tmp_path / "repo", path)


def test_cli_writes_the_repository(tmp_path, onnx_model, capsys):
    out = tmp_path / "model_repository"
    assert main(["triton", "--onnx", str(onnx_model), "--out", str(out), "--max-batch-size", "16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"model_repository": str(out), "platform": "onnxruntime_onnx"}
    assert str(out / "alexnet_acmix") in captured.err
    assert parse_config(out / "alexnet_acmix").max_batch_size == 16
    assert (out / "alexnet_acmix" / "1" / "model.onnx").is_file()

    engine = fake_engine(tmp_path, onnx_model)
    assert main(["triton", "--onnx", str(onnx_model), "--engine", str(engine), "--out", str(out),
                 "--model-name", "acmix_trt", "--instances", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["platform"] == "tensorrt_plan"
    assert parse_config(out / "acmix_trt").instance_group[0].count == 2


@pytest.mark.parametrize("argv, message", [
    (["--onnx", "{tmp}/missing.onnx"], "{tmp}/missing.onnx: no such ONNX file"),
    (["--engine", "{tmp}/missing.plan"], "{tmp}/missing.plan: no such engine file"),
    # asked for by name: refused, not replaced by the ONNX as a default engine path would be
    (["--engine", "{tmp}/bare.plan"], "{tmp}/bare.plan: no engine metadata beside it ({tmp}/bare.plan.json); "
                                      "build engines with python -m export engine"),
])
def test_cli_errors_are_one_line(tmp_path, onnx_model, capsys, argv, message):
    (tmp_path / "bare.plan").write_bytes(b"no metadata beside it")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if "--onnx" not in argv:
        argv += ["--onnx", str(onnx_model)]
    assert main(["triton", "--out", str(tmp_path / "repo"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {message.format(tmp=tmp_path)}"]
    assert not (tmp_path / "repo").exists()
