"""Every setting of the service, from environment variables (prefix ACMIX_), in one place.

`Settings.plan()` turns them into the artifacts the service runs (runtime.artifacts.ArtifactPlan):
what provisioning makes (export/provision.py) and what the backend loads, with one set of build
parameters, whichever path starts the service.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model import paths
from model.runtime import available_cores
from runtime.artifacts import ArtifactPlan, EngineSpec, default_engine_path, timing_cache_path

# A gRPC message may hold the upload limit plus this much of the message's own fields; gRPC's message
# limits are 32-bit signed integers.
GRPC_MESSAGE_OVERHEAD = 1 << 16
MAX_UPLOAD_BYTES = 2**31 - 1 - GRPC_MESSAGE_OVERHEAD
# Settings whose values an error names but never prints.
SECRETS = ("api_key",)


class Settings(BaseSettings):
    # hide_input_in_errors: a ValidationError printed whole (Ray Serve's import of service/ray_app.py)
    # must not show a refused API key; settings_problem names each input itself, secrets excepted.
    model_config = SettingsConfigDict(env_prefix="ACMIX_", env_file=None, protected_namespaces=(),
                                      hide_input_in_errors=True)

    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto: TensorRT where a GPU and TensorRT are present, else ONNX Runtime"
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="of whichever backend runs (fp16: TensorRT only); fp16 and int8 ONNX files are made "
                            "from the fp32 one"
    )
    weights_path: str = Field(paths.WEIGHTS, description="exported to ONNX if that is missing or from other weights")
    onnx_path: str = Field(paths.ONNX, description="the fp32 ONNX; other precisions' files beside it")
    engine_path: str | None = Field(
        None, description="the TensorRT engine; default: in ACMIX_ENGINE_DIR, else beside the ONNX, "
                          "<ONNX name>.<precision>.plan"
    )
    engine_dir: str | None = Field(None, description="where the default engine and timing cache go (default: the "
                                                     "ONNX's folder)")
    engine_workspace_mib: int = Field(2048, ge=1, description="TensorRT builder workspace")
    rebuild: bool = Field(True, description="make a missing or stale artifact at start, else refuse to start")
    model_name: str = "alexnet_acmix"

    max_batch_size: int = Field(32, ge=1, le=256, description="largest batch sent to the backend (and the engine "
                                                              "profile's max and opt)")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest a request waits for its batch to fill")
    max_queue_size: int = Field(512, ge=1, description="images waiting beyond this get 429 (a request of N takes N places)")
    request_timeout_s: float = Field(10.0, gt=0, description="a request not answered by then gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, le=MAX_UPLOAD_BYTES,
                                  description="larger bodies get 413 (gRPC: larger messages RESOURCE_EXHAUSTED)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body not received by then gets 408")
    shutdown_delay_s: float = Field(
        0.0, ge=0, le=600, description="after SIGTERM, readiness says 503 for this long while requests are still "
                                       "served, then the drain: the time a load balancer (Kubernetes' endpoints) "
                                       "takes to stop sending")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (decoded size) get 400")
    decode_threads: int = Field(default_factory=available_cores, ge=1, description="threads decoding images")
    inline_decode_pixels: int = Field(
        128 * 128, ge=0, description="images up to this size are decoded on the event loop (cheaper than a thread hop)"
    )
    inference_workers: int | None = Field(
        None, ge=1, description="batches computed at once by each process (ONNX Runtime; TensorRT runs one); "
                                "default: see batches_per_process"
    )
    intra_op_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads per batch; default: cores / (workers x batches per process)"
    )
    workers: str = Field(
        "auto", pattern=r"^(auto|[1-9][0-9]*)$",
        description="server processes sharing the ports (service/workers.py); auto: see resolved_workers")
    api_key: str | None = Field(None, description="when set, requests need header X-API-Key (or Bearer token)")
    max_consecutive_failures: int = Field(
        3, ge=0, description="batches failing in a row before readiness and liveness fail (0: never)")
    cors_origins: str = Field("", description="comma-separated origins allowed to call the API from a browser "
                                              "(empty: CORS off)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="the KServe v2 gRPC API's port (0: off)")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # Ray Serve (service/ray_app.py)
    ray_replicas: str = Field("2", pattern=r"^(auto|[1-9][0-9]*)$", description="a number, or auto (autoscaling)")
    ray_max_replicas: int = Field(4, ge=1, description="autoscaling's upper bound")
    ray_cpus_per_replica: float = Field(1.0, gt=0, description="CPU replicas' Ray resource request")

    def model_names(self) -> tuple[str, str]:
        """(the tensor model, the image model): the two models the KServe v2 API serves."""
        return self.model_name, self.model_name + "_image"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_name")
    @classmethod
    def _addressable(cls, value: str) -> str:
        """A name the v2 routes can address (/v2/models/<name>/...) and Triton's repository can hold."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value in (".", ".."):
            raise ValueError("must be letters, digits, '_', '.' or '-' (a URL path segment and a folder name)")
        return value

    @field_validator("api_key")
    @classmethod
    def _a_real_key(cls, value: str | None) -> str | None:
        """An empty key (a variable set from an empty secret) would have turned authentication off, and
        spaces around one made a key no header can carry (HTTP trims them): both refused."""
        if value is not None and (not value or value != value.strip()):
            raise ValueError("is empty or has spaces around it: give a key, or unset the variable for none")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Settings that are each valid but cannot work together."""
        if self.max_queue_delay_ms >= self.request_timeout_s * 1000:
            raise ValueError(f"ACMIX_MAX_QUEUE_DELAY_MS ({self.max_queue_delay_ms:g}) must be below "
                             f"ACMIX_REQUEST_TIMEOUT_S ({self.request_timeout_s:g} s): a lone request would wait past "
                             "its deadline")
        if self.grpc_port == self.port:
            raise ValueError(f"the HTTP and the gRPC port are both {self.port} (ACMIX_PORT or --port, ACMIX_GRPC_PORT "
                             "or --grpc-port); give gRPC another, or 0 for none")
        return self

    def resolved_backend(self) -> tuple[str, str]:
        """(onnxruntime or tensorrt, why): auto takes TensorRT where it and a CUDA GPU are present."""
        if self.backend != "auto":
            return self.backend, f"set by ACMIX_BACKEND={self.backend}"
        from runtime.cuda import tensorrt_status

        available, why = tensorrt_status()
        if available:
            return "tensorrt", "auto: a GPU and TensorRT are present"
        return "onnxruntime", f"auto: {why}"

    def resolved_workers(self, backend: str) -> int:
        """The number of server processes. auto, on TensorRT: one per 4 cores, at most 8 (each
        process feeds the one GPU through its own execution context; one event loop tops out at
        450-725 single-JPEG requests a second, a GPU engine computes tens of thousands of images).
        On ONNX Runtime: half the cores, at least 2, never more than the cores, so each process's
        batch gets 2 threads on a many-core host (threads_per_batch) and 1 on 2 cores (measured
        there: 2 processes served the real model 7% faster than one with a lower p99, README "Scale
        up on one host"). A request costs about 1.5 ms of a core for HTTP and decoding and 2.6 ms of
        inference (Intel Xeon), so 16 cores answer ~3,900 a second while one event loop carries
        450-725: a quarter of the cores (the rule before session 21) left cores idle, and 8 sessions
        of 2 threads computed 1.6x the images a second of 4 of 4 (session 19, 16-core Xeon).
        About 280 MB of memory per process with the real model."""
        if self.workers != "auto":
            return int(self.workers)
        cores = available_cores()
        if backend == "tensorrt":
            return max(1, min(8, cores // 4))
        return min(cores, max(2, cores // 2))

    def batches_per_process(self, workers: int) -> int:
        """Batches each of `workers` processes computes at once (inference_workers, when set). By
        default two in a single process, so that the cores do not wait while one batch's replies go
        out and the next fills; one where there are several processes, whose batches fill those gaps
        for each other: measured on a 2-core Intel Xeon with 2 processes and the real model, one batch each
        served 469-504 req/s with a p99 of 185-194 ms against 441-465 req/s and 275-284 ms for two
        (README, "Scale up on one host")."""
        if self.inference_workers:
            return self.inference_workers
        return 2 if workers == 1 else 1

    def threads_per_batch(self, workers: int) -> int:
        """ONNX Runtime threads per batch: so that processes x batches at once x threads <= cores."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, available_cores() // (workers * self.batches_per_process(workers)))

    def plan(self, backend: str | None = None) -> ArtifactPlan:
        """The artifacts these settings run; `backend` when it is resolved already."""
        backend = backend or self.resolved_backend()[0]
        onnx = Path(self.onnx_path)
        engine = Path(self.engine_path) if self.engine_path else default_engine_path(onnx, self.precision,
                                                                                     self.engine_dir)
        spec = EngineSpec(self.precision, 1, self.max_batch_size, self.max_batch_size, self.engine_workspace_mib)
        return ArtifactPlan(
            backend=backend,
            precision=self.precision,
            weights=Path(self.weights_path),
            onnx=onnx,
            engine=engine if backend == "tensorrt" else None,
            engine_spec=spec,
            timing_cache=timing_cache_path(engine) if backend == "tensorrt" else None,
            rebuild=self.rebuild,
        )


# ACMIX_* variables that are not settings but are read elsewhere: the tools' data folder
# (model/paths.py), the supervisor's to its workers (service/workers.py), provisioning's to its
# children (export/provision.py).
OTHER_VARIABLES = ("ACMIX_DATA_DIR", "ACMIX_WORKER_INDEX", "ACMIX_WORKER_COUNT", "ACMIX_WORKER_FOLDER",
                   "ACMIX_PROVISION_LOCK_HELD")


def unknown_variables(environ) -> list[str]:
    """Each ACMIX_* variable of `environ` that nothing reads (a misspelt setting, which pydantic-settings
    ignores), with the setting it is closest to: 'ACMIX_REQUEST_TIMEOUT (ACMIX_REQUEST_TIMEOUT_S?)'."""
    known = [f"ACMIX_{name.upper()}" for name in Settings.model_fields] + list(OTHER_VARIABLES)
    unknown = []
    for name in sorted(v for v in environ if v.upper().startswith("ACMIX_") and v.upper() not in known):
        # compared without the prefix all of them share
        close = difflib.get_close_matches(name.upper()[6:], [k[6:] for k in known], n=1, cutoff=0.75)
        unknown.append(f"{name} (ACMIX_{close[0]}?)" if close else name)
    return unknown


def address(host: str, port: int) -> str:
    """host:port as URLs and gRPC write it: an IPv6 host in brackets ([::1]:8001)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def settings_problem(error: ValidationError) -> str:
    """One line naming each invalid setting by its environment variable, and why."""
    problems = []
    for item in error.errors():
        reason = item["msg"].removeprefix("Value error, ")
        if item["loc"] and item["loc"][0] in SECRETS:  # named, never echoed into a log
            problems.append(f"ACMIX_{str(item['loc'][0]).upper()}: {reason}")
        elif item["loc"]:
            problems.append(f"ACMIX_{str(item['loc'][0]).upper()}={item['input']!r}: {reason}")
        else:  # settings that are each valid but clash
            problems.append(reason)
    return "invalid settings: " + "; ".join(problems)
