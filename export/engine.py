"""ONNX -> TensorRT engine, and the metadata that tells whether an engine is still usable.

Written for TensorRT 10 and 11: the network is always strongly typed (11 has no other kind and
no FP16 builder flag), so an fp16 engine comes from an fp16 ONNX (export/fp16.py). Every engine
gets `<engine>.json` beside it (versions, GPU, ONNX hash, profile); `engine_status` compares
it with this host, which is pure logic given a `host` dict. TensorRT and cuda-python are
imported lazily so that everything but the build itself works on a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from export.errors import ExportError
from model.spec import INPUT_NAME, INPUT_SHAPE

PRECISIONS = ("fp32", "fp16")
METADATA_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "engine_sha256", "precision",
                 "profile")


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime`, or `cuda.cudart` in older cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def stream_handle(stream) -> int:
    """The address of a cuda-python stream object, for TensorRT's execute_async_v3. cuda-bindings 13
    deprecates int(obj) for this in favour of get_cuda_native_handle."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return get_cuda_native_handle(stream)


def cuda_call(result):
    """Unpack a cuda-python result `(cudaError_t, *values)`: RuntimeError on an error, else the value(s)."""
    err, *values = result
    if err.value != 0:  # cudaSuccess is 0 in every cuda-python version
        raise RuntimeError(f"CUDA error {err.value} ({getattr(err, 'name', err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_status() -> tuple[bool, str]:
    """(True, versions) when TensorRT and cuda-python import and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return False, f"TensorRT is not installed ({exc})"
    try:
        cudart = import_cudart()
    except Exception as exc:
        return False, f"cuda-python is not installed ({exc})"
    try:
        count = cuda_call(cudart.cudaGetDeviceCount())
    except Exception as exc:  # no driver, or a driver too old for this runtime
        return False, f"no CUDA GPU is visible ({exc})"
    if count < 1:
        return False, "no CUDA GPU is visible"
    return True, f"TensorRT {trt.__version__}, {count} CUDA GPU(s)"


def host_info(device: int = 0) -> dict:
    """What an engine is tied to on this host: TensorRT version, GPU name and compute capability."""
    import tensorrt as trt

    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_driver_version": cuda_version(cuda_call(cudart.cudaDriverGetVersion())),
        "cuda_runtime_version": cuda_version(cuda_call(cudart.cudaRuntimeGetVersion())),
    }


def cuda_version(number: int) -> str:
    """CUDA's integer version, 12040 -> "12.4"."""
    return f"{number // 1000}.{number % 1000 // 10}"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def engine_metadata_path(engine_path: str | Path) -> Path:
    """build/alexnet_acmix.fp16.engine -> build/alexnet_acmix.fp16.engine.json."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_metadata(engine_path: str | Path) -> dict | None:
    """The engine's metadata, or None when it is missing or not a JSON object."""
    try:
        metadata = json.loads(engine_metadata_path(engine_path).read_text())
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def write_metadata(engine_path: str | Path, metadata: dict) -> Path:
    path = engine_metadata_path(engine_path)
    write_atomic(path, (json.dumps(metadata, indent=2) + "\n").encode())
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file, so that a crash never leaves half an engine under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def onnx_precision(onnx_path: str | Path) -> str:
    """"fp16" when the ONNX file holds float16 weights, else "fp32"."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def validate_build_args(onnx_path: Path, precision: str, min_batch: int, opt_batch: int, max_batch: int,
                        workspace_mib: int) -> None:
    """ExportError with one clear line for arguments that cannot give a usable engine."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mib < 1:
        raise ExportError(f"workspace must be at least 1 MiB, got {workspace_mib}")
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    # A strongly typed network keeps the ONNX's types, so the precision is decided by the file.
    found = onnx_precision(onnx_path)
    if found != precision:
        hint = " (convert it with export.fp16.convert_fp16 first)" if precision == "fp16" else ""
        raise ExportError(f"{onnx_path} is an {found} model, not {precision}{hint}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp32", min_batch: int = 1,
                 opt_batch: int = 32, max_batch: int = 256, workspace_mib: int = 2048,
                 timing_cache: str | Path | None = None, progress: bool = True,
                 source_onnx_sha256: str | None = None) -> dict:
    """Build a TensorRT engine from `onnx_path`, write it and its metadata; returns the metadata.

    For fp16 pass the fp16 ONNX, and the sha256 of the fp32 ONNX it came from as
    `source_onnx_sha256`, so that the engine is judged against the file the service is given.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    validate_build_args(onnx_path, precision, min_batch, opt_batch, max_batch, workspace_mib)
    ok, reason = tensorrt_status()
    if not ok:
        raise ExportError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    host = host_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = parse_onnx(trt, network, logger, onnx_path)  # the parser owns the weights until the build ends
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default (Ampere and newer): "fp32" should mean fp32, checked at 99.9% top-1
        # against ONNX Runtime; fp16 is the fast engine.
        config.clear_flag(trt.BuilderFlag.TF32)
    config.add_optimization_profile(batch_profile(builder, min_batch, opt_batch, max_batch))
    if timing_cache is not None:
        load_timing_cache(config, Path(timing_cache))
    monitor = progress_monitor(trt) if progress else None  # must outlive the build
    if monitor is not None:
        config.progress_monitor = monitor
    elif progress:
        print(f"building the {precision} TensorRT engine (this takes a few minutes)...", file=sys.stderr)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    del parser
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    if timing_cache is not None:
        write_atomic(Path(timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))
    write_atomic(engine_path, bytes(memoryview(serialized)))
    metadata = {
        "tensorrt_version": host["tensorrt_version"],
        "gpu_name": host["gpu_name"],
        "compute_capability": host["compute_capability"],
        "cuda_driver_version": host["cuda_driver_version"],
        "cuda_runtime_version": host["cuda_runtime_version"],
        "onnx_sha256": sha256_file(onnx_path),
        "source_onnx_sha256": source_onnx_sha256,
        "engine_sha256": sha256_file(engine_path),
        "precision": precision,
        "profile": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "workspace_mib": workspace_mib,
        "build_seconds": round(seconds, 1),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_metadata(engine_path, metadata)
    return metadata


def parse_onnx(trt, network, logger, onnx_path: Path):
    """Fill `network` from the ONNX file; returns the parser, which must live until the build is done."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        first = parser.get_error(0).desc() if parser.num_errors else "no detail"
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {first}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [INPUT_NAME]:
        raise ExportError(f"{onnx_path}: expected the single input {INPUT_NAME!r}, found {inputs}")
    return parser


def batch_profile(builder, min_batch: int, opt_batch: int, max_batch: int):
    """The one optimization profile: the batch dimension of `image` from min to max, tuned for opt."""
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, min=(min_batch, *INPUT_SHAPE), opt=(opt_batch, *INPUT_SHAPE),
                      max=(max_batch, *INPUT_SHAPE))
    return profile


def strongly_typed_flags(trt) -> int:
    """create_network flags: STRONGLY_TYPED on TensorRT 10; 11 deprecates the flag (every network
    is strongly typed there) and a later version may drop it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def load_timing_cache(config, path: Path) -> None:
    """Reuse kernel timings from earlier builds; a cache from another GPU or version starts afresh."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)  # None (or an exception) for a corrupt file
        # ignore_mismatch=False: timings measured on a different device may pick wrong kernels.
        loaded = cache is not None and config.set_timing_cache(cache, False)
    except (RuntimeError, TypeError):
        loaded = False
    if not loaded:
        config.set_timing_cache(config.create_timing_cache(b""), False)


def progress_monitor(trt):
    """A tqdm bar per build phase through TensorRT's IProgressMonitor; None where it does not exist."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    import threading

    from tqdm import tqdm

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.bars = {}
            self.lock = threading.Lock()  # TensorRT may report from several threads

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step",
                                             position=len(self.bars), leave=parent_phase is None)

        def step_complete(self, phase_name, step):
            with self.lock:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)  # `step` is the 0-based index of the step just done
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self.lock:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


def engine_status(engine_path: str | Path, onnx_path: str | Path | None, host: dict | None = None,
                  precision: str | None = None, max_batch: int | None = None) -> tuple[bool, str]:
    """(True, summary) when the engine can serve `onnx_path` on this host, else (False, the first reason).

    `host` is `host_info()` (asked for only when needed); onnx_path=None skips the ONNX check.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        return False, f"{engine_path}: no engine file"
    metadata = read_metadata(engine_path)
    if metadata is None:
        return False, f"{engine_metadata_path(engine_path)}: engine metadata is missing or unreadable"
    problem = metadata_problem(metadata)
    if problem:
        return False, f"{engine_metadata_path(engine_path)}: {problem}"
    if metadata["engine_sha256"] != sha256_file(engine_path):
        return False, f"{engine_path} is not the engine its metadata describes"
    if onnx_path is not None:
        stale = onnx_mismatch(metadata, Path(onnx_path))
        if stale:
            return False, stale
    if host is None:
        ok, reason = tensorrt_status()
        if not ok:
            return False, f"cannot check {engine_path} against this host: {reason}"
        host = host_info()
    for key, label in (("tensorrt_version", "TensorRT"), ("gpu_name", "GPU"),
                       ("compute_capability", "compute capability")):
        if metadata[key] != host.get(key):
            return False, f"{engine_path} was built for {label} {metadata[key]}, this host has {host.get(key)}"
    if precision is not None and metadata["precision"] != precision:
        return False, f"{engine_path} is {metadata['precision']}, {precision} was asked for"
    if max_batch is not None and metadata["profile"]["max"] < max_batch:
        return False, f"{engine_path} takes batches up to {metadata['profile']['max']}, {max_batch} was asked for"
    profile = metadata["profile"]
    return True, (f"{engine_path}: {metadata['precision']}, batch {profile['min']}..{profile['max']}, "
                  f"TensorRT {metadata['tensorrt_version']} on {metadata['gpu_name']}")


def metadata_problem(metadata: dict) -> str | None:
    """What makes metadata unusable (a missing field or a malformed profile), or None."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        return f"engine metadata lacks {', '.join(missing)}"
    profile = metadata["profile"]
    if not isinstance(profile, dict) or not all(isinstance(profile.get(k), int) for k in ("min", "opt", "max")):
        return "engine metadata has no valid profile"
    return None


def onnx_mismatch(metadata: dict, onnx_path: Path) -> str | None:
    """Why the engine was not built from `onnx_path` (fp16 engines record their fp32 source), or None."""
    if not onnx_path.is_file():
        return f"{onnx_path}: no such ONNX file to check the engine against"
    expected = metadata.get("source_onnx_sha256") or metadata["onnx_sha256"]
    if sha256_file(onnx_path) != expected:
        return f"{onnx_path} changed since the engine was built"
    return None


def ensure_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp32", *, min_batch: int = 1,
                  opt_batch: int | None = None, max_batch: int = 256, workspace_mib: int = 2048,
                  timing_cache: str | Path | None = None, rebuild: bool = False, progress: bool = True,
                  host: dict | None = None, force: bool = False) -> tuple[Path, str]:
    """A usable engine for `onnx_path`: the existing one, else a fresh build when `rebuild` allows it.

    Returns (engine path, what happened); ExportError with the staleness reason when the engine
    is unusable and rebuilding is off. fp16 engines are built from fp16_onnx_path(onnx_path);
    opt_batch defaults to min(32, max_batch). force rebuilds even a usable engine.
    """
    from export.fp16 import convert_fp16, fp16_onnx_path

    engine_path = Path(engine_path)
    ok, reason = engine_status(engine_path, onnx_path, host=host, precision=precision, max_batch=max_batch)
    if ok and not force:
        return engine_path, reason
    if force:
        reason = "rebuild forced"
    elif not rebuild:
        raise ExportError(
            f"{reason}; rebuild it with `python -m export engine` or set ACMIX_ENGINE_REBUILD=true"
        )
    source, source_sha = Path(onnx_path), None
    if precision == "fp16":
        source, source_sha = convert_fp16(onnx_path, fp16_onnx_path(onnx_path)), sha256_file(onnx_path)
    opt_batch = min(32, max_batch) if opt_batch is None else opt_batch
    build_engine(source, engine_path, precision, min_batch, opt_batch, max_batch, workspace_mib, timing_cache,
                 progress, source_onnx_sha256=source_sha)
    return engine_path, f"built {engine_path} ({reason})"
