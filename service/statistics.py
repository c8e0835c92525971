"""Triton's statistics extension: per model, what its inference requests have cost since this server
process started (GET /v2/models[/<model>[/versions/<v>]]/stats, gRPC ModelStatistics; what
perf_analyzer reads for its server-side figures).

A request (KServe v2 over HTTP or gRPC) counts once: `success` or `fail` with its duration from
its inputs read to its logits, `queue` the longest any of its images waited for a batch,
`compute_infer` the longest batch any of them was in, `compute_input` the decoding and
preprocessing of the image model's files (0 for tensors); `compute_output` is not measured (0).
`inference_count` counts images, `execution_count` the batches that held any of the model's
images (the batcher's count). With several server processes each answers for its own requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(int(seconds * 1e9), 0)


@dataclass
class ModelStatistics:
    name: str
    last_inference: int = 0  # milliseconds since the epoch
    inference_count: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {name: Duration() for name in DURATIONS})

    def as_json(self, version: str, execution_count: int) -> dict:
        """Triton's JSON form of one model's statistics."""
        return {"name": self.name, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": execution_count,
                "inference_stats": {name: {"count": d.count, "ns": d.ns} for name, d in self.durations.items()},
                "batch_stats": []}


class Statistics:
    def __init__(self, names: tuple[str, ...]):
        self.models = {name: ModelStatistics(name) for name in names}

    def succeeded(self, model: str, images: int, total_s: float, queue_s: float, infer_s: float,
                  input_s: float) -> None:
        stats = self.models[model]
        stats.inference_count += images
        stats.last_inference = int(time.time() * 1000)
        for name, seconds in (("success", total_s), ("queue", queue_s), ("compute_infer", infer_s),
                              ("compute_input", input_s), ("compute_output", 0.0)):
            stats.durations[name].add(seconds)

    def failed(self, model: str, total_s: float) -> None:
        self.models[model].durations["fail"].add(total_s)

    def as_json(self, models: list[str], version: str, executions: dict[str, int]) -> dict:
        """Triton's JSON answer for `models`; `executions`: the batches that held each (the batcher's count)."""
        return {"model_stats": [self.models[name].as_json(version, executions.get(name, 0)) for name in models]}
