"""A Triton Inference Server model repository for the exported model: `python -m export triton`.

    <out>/<model_name>/config.pbtxt
    <out>/<model_name>/labels.txt          CIFAR-10 class names, one a line, in class-id order
    <out>/<model_name>/1/model.plan        the TensorRT engine, when there is one with metadata
    <out>/<model_name>/1/model.onnx        else the ONNX model (ONNX Runtime backend)

config.pbtxt is Triton's `inference.ModelConfig` message in protobuf text format, built with the
ModelConfig class that tritonclient ships (tritonclient/grpc/model_config_pb2.py), so a field
Triton does not know cannot be written. That module needs only protobuf; its package's
__init__ needs grpcio, which tritonclient[http] does not install, so it is loaded from its file.
`labels.txt` on the output lets Triton's classification extension return "value:index:label".
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from export.errors import ExportError
from model.spec import CLASSES, INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from runtime.artifacts import metadata_problem, onnx_mismatch, read_metadata

PLATFORMS = {"plan": ("tensorrt_plan", "model.plan", "KIND_GPU"), "onnx": ("onnxruntime_onnx", "model.onnx", "KIND_CPU")}
KINDS = ("KIND_GPU", "KIND_CPU")
VERSION = "1"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
PB2_MODULE = "tritonclient.grpc.model_config_pb2"


def model_config_pb2():
    """tritonclient's generated `model_config_pb2` (ModelConfig, DataType), without importing grpcio."""
    if PB2_MODULE in sys.modules:
        return sys.modules[PB2_MODULE]
    spec = importlib.util.find_spec("tritonclient")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(p) / "grpc" / "model_config_pb2.py" for p in locations
                 if (Path(p) / "grpc" / "model_config_pb2.py").is_file()), None)
    if path is None:
        raise ExportError("tritonclient is not installed (pip install 'tritonclient[http]'): "
                          "it defines Triton's ModelConfig")
    module_spec = importlib.util.spec_from_file_location(PB2_MODULE, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    # Registered under its own name: one set of message classes per process, and
    # `import tritonclient.grpc` (where grpcio is installed) finds it already there.
    sys.modules[PB2_MODULE] = module
    return module


def read_model_config(model_dir: str | Path):
    """`<model_dir>/config.pbtxt` parsed into a ModelConfig message."""
    from google.protobuf import text_format

    return text_format.Parse((Path(model_dir) / CONFIG_FILE).read_text(), model_config_pb2().ModelConfig())


def check_onnx_io(onnx_path: Path) -> None:
    """ExportError unless the ONNX takes `image` FP32 [batch, 3, 128, 128] and gives `logits` FP32 [batch, 10]."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # DecodeError and friends: not an ONNX file
        raise ExportError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    initializers = {init.name for init in graph.initializer}
    found = {
        kind: {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
               for v in values if v.name not in initializers}
        for kind, values in (("input", graph.input), ("output", graph.output))
    }
    expected = {"input": {INPUT_NAME: INPUT_SHAPE}, "output": {OUTPUT_NAME: (NUM_CLASSES,)}}
    for kind, tensors in expected.items():
        if set(found[kind]) != set(tensors):
            raise ExportError(f"{onnx_path}: {kind}s are {sorted(found[kind])}, Triton's config expects {sorted(tensors)}")
        for name, shape in tensors.items():
            elem_type, dims = found[kind][name]
            batch_is_dynamic = bool(dims) and (isinstance(dims[0], str) or dims[0] == 0)
            if elem_type != onnx.TensorProto.FLOAT or not batch_is_dynamic or tuple(dims[1:]) != tuple(shape):
                raise ExportError(f"{onnx_path}: {kind} {name!r} is {onnx.TensorProto.DataType.Name(elem_type)} "
                                  f"{dims}, expected FLOAT [batch, {', '.join(map(str, shape))}]")


def plan_profile(engine_path: str | Path | None, onnx_path: Path) -> dict | None:
    """The engine's {min, opt, max} batch profile when `engine_path` is an engine with metadata, else None."""
    if engine_path is None or not Path(engine_path).is_file():
        return None
    metadata = read_metadata(engine_path)
    if metadata is None:
        print(f"note: {engine_path} has no engine metadata beside it; writing the ONNX model instead", file=sys.stderr)
        return None
    problem = metadata_problem(metadata) or onnx_mismatch(metadata, onnx_path)
    if problem:
        raise ExportError(f"{engine_path}: {problem}")
    return metadata["profile"]


def normalize_kind(kind: str) -> str:
    name = kind.upper()
    name = name if name.startswith("KIND_") else f"KIND_{name}"
    if name not in KINDS:
        raise ExportError(f"instance kind must be one of gpu, cpu, {', '.join(KINDS)}; not {kind!r}")
    return name


def build_config(platform: str, model_name: str, max_batch_size: int, preferred: list[int], queue_delay_us: int,
                 instances: int, kind: str):
    """The ModelConfig message for this model."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=model_name, platform=platform, max_batch_size=max_batch_size)
    config.input.add(name=INPUT_NAME, data_type=pb2.TYPE_FP32, dims=list(INPUT_SHAPE))
    config.output.add(name=OUTPUT_NAME, data_type=pb2.TYPE_FP32, dims=[NUM_CLASSES], label_filename=LABELS_FILE)
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=pb2.ModelInstanceGroup.Kind.Value(kind))
    return config


def write_model_repository(out: str | Path, onnx_path: str | Path, engine_path: str | Path | None = None,
                           model_name: str = "alexnet_acmix", max_batch_size: int = 32, queue_delay_us: int = 5000,
                           instances: int = 1, kind: str | None = None) -> Path:
    """Write (or overwrite) `<out>/<model_name>` as a Triton model; returns that model directory.

    The TensorRT plan is used when `engine_path` is a file with metadata (export/engine.py) built
    from `onnx_path`; otherwise the ONNX. `kind` is gpu/cpu (or KIND_GPU/KIND_CPU); by default
    KIND_GPU for a plan and KIND_CPU for the ONNX.
    """
    out, onnx_path = Path(out), Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    if not model_name or model_name in (".", "..") or "/" in model_name or "\\" in model_name:
        raise ExportError(f"model name must be a plain directory name, not {model_name!r}")
    if max_batch_size < 1:
        raise ExportError(f"max batch size must be at least 1, got {max_batch_size}")
    if queue_delay_us < 0:
        raise ExportError(f"queue delay must be at least 0 microseconds, got {queue_delay_us}")
    if instances < 1:
        raise ExportError(f"instance count must be at least 1, got {instances}")
    check_onnx_io(onnx_path)

    profile = plan_profile(engine_path, onnx_path)
    if profile is not None:
        if max_batch_size > profile["max"]:
            raise ExportError(f"max batch size {max_batch_size} exceeds the engine's profile max {profile['max']} "
                              f"({engine_path}); lower it or rebuild the engine with a larger --max-batch")
        if profile["min"] > 1:
            raise ExportError(f"{engine_path} takes batches from {profile['min']}, Triton sends batches from 1")
        opt = profile["opt"]
    else:
        opt = max_batch_size
    platform, filename, default_kind = PLATFORMS["plan" if profile is not None else "onnx"]
    preferred = sorted({min(opt, max_batch_size), max_batch_size})
    config = build_config(platform, model_name, max_batch_size, preferred, queue_delay_us, instances,
                          normalize_kind(kind or default_kind))

    from google.protobuf import text_format

    model_dir = out / model_name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    for _, other, _ in PLATFORMS.values():  # a repository rewritten for the other platform keeps one model file
        if other != filename:
            (version_dir / other).unlink(missing_ok=True)
    shutil.copyfile(engine_path if profile is not None else onnx_path, version_dir / filename)
    (model_dir / LABELS_FILE).write_text("".join(f"{name}\n" for name in CLASSES))
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
    return model_dir
