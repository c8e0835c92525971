"""Every setting of the service, from environment variables (prefix ACMIX_), in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.runtime import available_cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACMIX_", env_file=None, protected_namespaces=())

    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto: TensorRT where a GPU and TensorRT are present, else ONNX Runtime"
    )
    weights_path: str = Field("model/weights/alexnet_acmix.pdparams", description="exported to ONNX if that is missing or from other weights")
    onnx_path: str = Field("build/alexnet_acmix.onnx", description="the ONNX model (ONNX Runtime, engine builds)")
    engine_path: str = Field("build/alexnet_acmix.fp32.plan", description="the TensorRT engine")
    engine_precision: Literal["fp32", "fp16"] = "fp32"
    engine_rebuild: bool = Field(True, description="rebuild a missing or stale engine at start, else refuse to start")
    model_name: str = "alexnet_acmix"

    max_batch_size: int = Field(32, ge=1, le=256, description="largest batch sent to the backend")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest a request waits for its batch to fill")
    max_queue_size: int = Field(512, ge=1, description="requests waiting beyond this get 429")
    request_timeout_s: float = Field(10.0, gt=0, description="a request not answered by then gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="larger bodies get 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (decoded size) get 400")
    decode_threads: int = Field(default_factory=available_cores, ge=1, description="threads decoding images")
    inline_decode_pixels: int = Field(
        128 * 128, ge=0, description="images up to this size are decoded on the event loop (cheaper than a thread hop)"
    )
    inference_workers: int = Field(
        2, ge=1, description="batches computed at once (ONNX Runtime; TensorRT runs one), so cores never wait"
    )
    intra_op_threads: int = Field(
        default_factory=lambda data: max(1, available_cores() // data["inference_workers"]),
        ge=1,
        description="ONNX Runtime threads per batch; default: cores / inference_workers",
    )
    api_key: str | None = Field(None, description="when set, requests need header X-API-Key (or Bearer token)")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
