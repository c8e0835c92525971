"""ONNX -> TensorRT engine: build, verify, and only then record it as usable.

Written for TensorRT 10 and 11: the network is always strongly typed (11 has no other kind and
no FP16 or INT8 builder flag), so the engine's precision is the ONNX file's: fp16 comes from an
fp16 ONNX (export/fp16.py), int8 from a QDQ ONNX (export/int8.py, explicit quantization). The
engine is built under a temporary name and moved into place, with `<engine>.json`
(runtime/artifacts.py) saying `verified: true`, only after it has reproduced the reference logits
recorded at export (export/reference.py): an engine that fails is removed, never left behind as
current. TensorRT is imported lazily.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from export.errors import ExportError
from model.files import staged, write_bytes
from model.spec import INPUT_NAME, INPUT_SHAPE
from runtime.artifacts import EngineSpec, engine_metadata_path, sha256_file, write_metadata
from runtime.cuda import host_info, tensorrt_status


def onnx_precision(onnx_path: str | Path) -> str:
    """"int8" for a QDQ ONNX, "fp16" when it holds float16 weights, else "fp32"."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        return "int8"
    fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def check_build_args(onnx_path: Path, spec: EngineSpec) -> None:
    """ExportError with one clear line for arguments that cannot give a usable engine."""
    problem = spec.problem()
    if problem:
        raise ExportError(problem)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    # A strongly typed network keeps the ONNX's types, so the precision is decided by the file.
    found = onnx_precision(onnx_path)
    if found != spec.precision:
        raise ExportError(f"{onnx_path} is an {found} model, not {spec.precision} "
                          f"(python -m export onnx --precision {spec.precision} writes one)")


def build_engine(onnx_path: str | Path, engine_path: str | Path, spec: EngineSpec,
                 timing_cache: str | Path | None = None, progress: bool = True) -> dict:
    """Build a TensorRT engine from `onnx_path` and write it; returns its metadata, not yet written
    (`make_engine` writes it once the engine passed its check)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_build_args(onnx_path, spec)
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
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default (Ampere and newer): "fp32" should mean fp32; fp16 is the fast engine.
        config.clear_flag(trt.BuilderFlag.TF32)
    config.add_optimization_profile(batch_profile(builder, spec))
    if timing_cache is not None:
        load_timing_cache(config, Path(timing_cache))
    monitor = progress_monitor(trt) if progress else None  # must outlive the build
    if monitor is not None:
        config.progress_monitor = monitor
    elif progress:
        print(f"building the {spec.precision} TensorRT engine (this takes a few minutes)...", file=sys.stderr)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    del parser
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    if timing_cache is not None:
        write_bytes(Path(timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))
    write_bytes(engine_path, bytes(memoryview(serialized)))
    return {
        **host,
        "onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine_path),
        "precision": spec.precision,
        "profile": {"min": spec.min_batch, "opt": spec.opt_batch, "max": spec.max_batch},
        "workspace_mib": spec.workspace_mib,
        "build_seconds": round(seconds, 1),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "verified": False,
    }


def make_engine(onnx_path: str | Path, engine_path: str | Path, spec: EngineSpec, check: Callable[[Path], dict],
                timing_cache: str | Path | None = None, progress: bool = True) -> dict:
    """Build the engine beside `engine_path`, run `check` on it (ExportError when it is wrong), and
    only then put it in place with its metadata, verified. A failed build or check leaves the
    previous engine as it was and nothing else behind."""
    engine_path = Path(engine_path)
    unverified = staged(engine_path)
    try:
        metadata = build_engine(onnx_path, unverified, spec, timing_cache, progress)
        metadata["verification"] = check(unverified)
    except BaseException:
        unverified.unlink(missing_ok=True)
        raise
    metadata["verified"] = True
    # No moment where old metadata describes the new engine: metadata out, engine in, metadata in.
    engine_metadata_path(engine_path).unlink(missing_ok=True)
    os.replace(unverified, engine_path)
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


def batch_profile(builder, spec: EngineSpec):
    """The one optimization profile: the batch dimension of `image` from min to max, tuned for opt."""
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, min=(spec.min_batch, *INPUT_SHAPE), opt=(spec.opt_batch, *INPUT_SHAPE),
                      max=(spec.max_batch, *INPUT_SHAPE))
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
