"""What an artifact records about itself, and whether it is current.

Each artifact records the digest of the one it was made from, and is current while that matches:

    weights --> fp32 ONNX (weights_sha256) --> fp16 / int8 ONNX (source_onnx_sha256) --> engine (onnx_sha256)

* An ONNX file names its parent in its metadata; `onnx_staleness` compares it with the parent on disk,
  and for a derived file the form its precision is written in now (DERIVED_FORMS), so that a file an
  earlier export wrote in another form is made again.
* A TensorRT engine has `<engine>.json` beside it: versions, GPU, the ONNX it was built from, its
  precision and batch profile, and `verified` (written only after the engine reproduced ONNX
  Runtime's logits). `engine_status` compares it with this host and with what is asked for: an
  `EngineSpec`, the one set of build parameters that provisioning derives from the settings.

Pure logic and file reads; ONNX metadata is read through ONNX Runtime (every image has it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from model.files import sha256_file, write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
# Metadata of ONNX files: the digest of the weights (fp32) or of the fp32 ONNX (fp16, int8) they came from.
WEIGHTS_DIGEST = "weights_sha256"
SOURCE_DIGEST = "source_onnx_sha256"
# What a derived file of each precision records about its form, beside its source's digest. int8: its
# quantized convolutions' biases are float, not int32 (TensorRT's ONNX parser dequantizes only 8-bit
# values; ONNX Runtime's CPU graph quantizes them at load: runtime/int8_cpu_graph.py). Files made
# before session 22 record no form and had int32 biases.
DERIVED_FORMS = {"int8": {"int8_bias": "float"}}
# The softmax temperature fitted on the validation split (model/calibration.py), when shipped.
TEMPERATURE = "temperature"
METADATA_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "engine_sha256", "precision",
                 "profile", "verified")


@dataclass(frozen=True)
class EngineSpec:
    """How an engine is built: its precision, its batch profile and the builder's workspace.

    An existing engine serves this spec when it has the precision and its profile covers
    min_batch..max_batch (opt only tunes kernels, so another opt is no reason to rebuild).
    """

    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 32
    workspace_mib: int = 2048

    def problem(self) -> str | None:
        """What makes this spec unbuildable, or None."""
        if self.precision not in PRECISIONS:
            return f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            return (f"batch sizes must satisfy 1 <= min <= opt <= max, got {self.min_batch}, {self.opt_batch}, "
                    f"{self.max_batch}")
        if self.workspace_mib < 1:
            return f"workspace must be at least 1 MiB, got {self.workspace_mib}"
        return None

    def as_dict(self) -> dict:
        return asdict(self)


def derived_onnx_path(onnx_path: str | Path, precision: str) -> Path:
    """The ONNX file of a precision, beside the fp32 one: build/alexnet_acmix.onnx ->
    build/alexnet_acmix.fp16.onnx, build/alexnet_acmix.int8.onnx (fp32: the file itself)."""
    onnx_path = Path(onnx_path)
    if precision == "fp32":
        return onnx_path
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}{onnx_path.suffix}")


def default_engine_path(onnx_path: str | Path, precision: str, folder: str | Path | None = None) -> Path:
    """The engine of an fp32 ONNX's precision where nothing else is asked: in `folder` (default the
    ONNX's own), build/alexnet_acmix.onnx -> build/alexnet_acmix.<precision>.plan."""
    onnx_path = Path(onnx_path)
    return Path(folder or onnx_path.parent) / f"{onnx_path.stem}.{precision}.plan"


def timing_cache_path(engine_path: str | Path) -> Path:
    """TensorRT's timing cache: one per folder of engines, beside them."""
    return Path(engine_path).parent / "timing.cache"


@dataclass(frozen=True)
class ArtifactPlan:
    """The artifacts a service configuration runs, where they are, and how missing ones are made.

    The service derives it from its settings (service/settings.py); provisioning
    (export/provision.py) makes what is missing or stale; the backend loads `served`.
    """

    backend: str  # "onnxruntime" or "tensorrt"
    precision: str
    weights: Path
    onnx: Path  # the fp32 ONNX, exported from the weights
    engine: Path | None = None  # TensorRT only
    engine_spec: EngineSpec = EngineSpec()  # frozen, so a shared default is safe
    timing_cache: Path | None = None
    rebuild: bool = True  # make a missing or stale artifact (else refuse, saying why)

    @property
    def onnx_for_precision(self) -> Path:
        return derived_onnx_path(self.onnx, self.precision)

    @property
    def served(self) -> Path:
        """The file the backend loads."""
        return self.engine if self.backend == "tensorrt" else self.onnx_for_precision


# --- ONNX ---------------------------------------------------------------------------------------


def onnx_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The custom metadata (key -> value) of an ONNX file, read by ONNX Runtime without optimizing it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if not Path(onnx_path).is_file():
        raise ValueError(f"{onnx_path}: no such ONNX file")
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's InvalidProtobuf, Fail and others, for a file it cannot load
        raise ValueError(f"{onnx_path}: not an ONNX file ONNX Runtime loads ({str(exc).splitlines()[0][:200]})") from None
    return dict(session.get_modelmeta().custom_metadata_map)


def onnx_temperature(onnx_path: str | Path) -> float:
    """The calibration temperature an ONNX file records; 1.0 (plain softmax) where it records none."""
    value = onnx_metadata(onnx_path).get(TEMPERATURE)
    try:
        temperature = float(value) if value is not None else 1.0
    except ValueError:
        temperature = float("nan")
    if not temperature > 0:
        raise ValueError(f"{onnx_path}: temperature {value!r} in its metadata is not a positive number")
    return temperature


def onnx_staleness(onnx_path: str | Path, parent: str | Path, key: str = WEIGHTS_DIGEST,
                   form: dict[str, str] | None = None) -> str | None:
    """Why `onnx_path` needs making (again) from `parent` (the weights, or for a derived ONNX the
    fp32 ONNX, with key=SOURCE_DIGEST and the `form` of its precision, DERIVED_FORMS); None if it
    can be used as it is.

    An ONNX file that does not say what it came from (brought by a user), or whose parent is not
    on this machine (an image that ships only the ONNX files), is used as it is.
    """
    if not Path(onnx_path).is_file():
        return f"{onnx_path} is missing"
    if Path(parent).is_file():
        try:
            metadata = onnx_metadata(onnx_path)
        except ValueError as exc:  # a file cut short or overwritten: made again from its parent
            return str(exc)
        recorded = metadata.get(key)
        if recorded not in (None, sha256_file(parent)):
            return f"{onnx_path} was made from another {'weights file' if key == WEIGHTS_DIGEST else 'ONNX'} than {parent}"
        for name, value in (form or {}).items():
            if recorded is not None and metadata.get(name) != value:
                return f"{onnx_path} was made by an earlier export ({name} {metadata.get(name)!r}, now {value!r})"
        if key == WEIGHTS_DIGEST and recorded is not None:
            from model.calibration import read_temperature

            shipped = read_temperature(Path(parent).parent)
            if shipped is not None and metadata.get(TEMPERATURE) != repr(shipped):
                return f"{onnx_path} does not record the temperature shipped with {parent} ({shipped:.4f})"
    return None


# --- TensorRT engines ---------------------------------------------------------------------------


def engine_metadata_path(engine_path: str | Path) -> Path:
    """build/alexnet_acmix.fp16.plan -> build/alexnet_acmix.fp16.plan.json."""
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
    return write_bytes(engine_metadata_path(engine_path), (json.dumps(metadata, indent=2) + "\n").encode())


def metadata_problem(metadata: dict) -> str | None:
    """What makes metadata unusable (a missing field, a malformed profile, no verification), or None."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        return f"engine metadata lacks {', '.join(missing)}"
    profile = metadata["profile"]
    if not isinstance(profile, dict) or not all(isinstance(profile.get(k), int) for k in ("min", "opt", "max")):
        return "engine metadata has no valid profile"
    if metadata["verified"] is not True:
        return "the engine did not pass its verification"
    return None


def onnx_mismatch(metadata: dict, onnx_path: Path) -> str | None:
    """Why the engine was not built from `onnx_path`, or None."""
    if not onnx_path.is_file():
        return f"{onnx_path}: no such ONNX file to check the engine against"
    if sha256_file(onnx_path) != metadata["onnx_sha256"]:
        return f"{onnx_path} changed since the engine was built"
    return None


def engine_status(engine_path: str | Path, onnx_path: str | Path | None, spec: EngineSpec | None = None,
                  host: dict | None = None) -> tuple[bool, str]:
    """(True, summary) when the engine, built from `onnx_path` (the ONNX of its precision), serves
    `spec` on this host, else (False, the first reason).

    `host` is runtime.cuda.host_info() (asked for only when needed); onnx_path=None skips the ONNX check.
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
        from runtime.cuda import host_info, tensorrt_status

        ok, reason = tensorrt_status()
        if not ok:
            return False, f"cannot check {engine_path} against this host: {reason}"
        host = host_info()
    for key, label in (("tensorrt_version", "TensorRT"), ("gpu_name", "GPU"),
                       ("compute_capability", "compute capability")):
        if metadata[key] != host.get(key):
            return False, f"{engine_path} was built for {label} {metadata[key]}, this host has {host.get(key)}"
    profile = metadata["profile"]
    if spec is not None:
        if metadata["precision"] != spec.precision:
            return False, f"{engine_path} is {metadata['precision']}, {spec.precision} was asked for"
        if profile["min"] > spec.min_batch or profile["max"] < spec.max_batch:
            return False, (f"{engine_path} takes batches {profile['min']}..{profile['max']}, "
                           f"{spec.min_batch}..{spec.max_batch} was asked for")
    return True, (f"{engine_path}: {metadata['precision']}, batch {profile['min']}..{profile['max']}, "
                  f"TensorRT {metadata['tensorrt_version']} on {metadata['gpu_name']}")
