"""Triton's statistics extension: per model, what its inference requests have cost since the server
started, over all its processes (GET /v2/models[/<model>[/versions/<v>]]/stats, gRPC
ModelStatistics; what perf_analyzer reads for its server-side figures, subtracting an answer from a
later one).

A request (KServe v2 over HTTP or gRPC) counts once: `success` or `fail` with its duration from
its inputs read to its logits, `queue` the longest any of its images waited for a batch,
`compute_infer` the longest batch any of them was in, `compute_input` the decoding and
preprocessing of the image model's files (0 for tensors); `compute_output` is not measured (0).
`queue` and the three `compute_*` count each success. `cache_hit` and `cache_miss` are always
{count 0, ns 0}: there is no response cache. `inference_count` counts images, `execution_count`
the batches that held any of the model's images (the batcher's count), and `batch_stats` divides
those batches by how many of the model's images each held (`batch_size`: a batch holding both
models' images counts in each, with its own share, so that batch_size x count summed over the
entries is the model's images computed): `compute_infer` their number and backend time;
`compute_input` and `compute_output` their number with 0 ns (not measured per batch: the stacking
of a batch's images is inside its backend time, and the image model's decoding is per request, the
`compute_input` above). Under Ray Serve, which batches out of the service's sight, no executions.

Every process answers for the whole server. The figures are prometheus_client counters in the app's
registry (on /metrics too, as model_*), and `last_inference` a gauge that keeps the most recently
set value. With several server processes (service/workers.py) prometheus_client's multiprocess
mode keeps each process's values in a file of the folder they share, and whichever process is asked
sums them all, those of workers that have exited and been replaced included: the figures only grow
while the supervisor runs (each start has a new folder). A single process (or a Ray Serve replica,
which has no shared folder) answers from its own registry. The values are float64, as Prometheus
keeps them: exact up to 2**53 (a sum of 104 days of durations, in ns), rounded beyond.
"""

from __future__ import annotations

import glob
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import shared_folder

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
NO_CACHE = ("cache_hit", "cache_miss")  # always zero: no response cache

# Why a request failed, in Triton's words (its nv_inference_request_failure's `reason`): refused or
# timed out before its answer (queue full, deadline, shutting down), cancelled by its client, failed
# in the backend, anything else (bad input).
REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

# The metrics' names, and their samples' (a counter's value is its name + "_total").
REQUESTS, DURATIONS_NS, INFERENCES = "model_requests", "model_request_duration_ns", "model_inferences"
BATCHES, BATCH_NS, LAST_INFERENCE = "model_batches", "model_batch_duration_ns", "model_last_inference_ms"
FAILURES, PENDING = "model_failures", "model_pending_requests"
SAMPLES = ({f"{name}_total" for name in (REQUESTS, DURATIONS_NS, INFERENCES, BATCHES, BATCH_NS, FAILURES)}
           | {LAST_INFERENCE, PENDING})
# The kinds of files prometheus_client's multiprocess mode writes these into (not the histograms').
FILES = ("counter_*.db", "gauge_mostrecent_*.db", "gauge_livesum_*.db")


def nanoseconds(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


class Statistics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(REQUESTS, "Inference requests by model and outcome (success, fail)",
                                ["model", "outcome"], registry=registry)
        self.durations = Counter(DURATIONS_NS, "Summed durations of the inference requests by model, in ns "
                                 "(Triton's statistics: success, fail, queue, compute_input, compute_infer)",
                                 ["model", "duration"], registry=registry)
        self.inferences = Counter(INFERENCES, "Images of the successful inference requests by model",
                                  ["model"], registry=registry)
        self.batches = Counter(BATCHES, "Batches computed by model and how many of its images each held",
                               ["model", "batch_size"], registry=registry)
        self.batch_durations = Counter(BATCH_NS, "Summed backend time of those batches, in ns",
                                       ["model", "batch_size"], registry=registry)
        self.last_inference = Gauge(LAST_INFERENCE, "When the model's last successful request ended, in ms "
                                    "since the epoch", ["model"], registry=registry, multiprocess_mode="mostrecent")
        self.failures = Counter(FAILURES, "Failed inference requests by model and reason (REJECTED, CANCELED, "
                                "BACKEND, OTHER)", ["model", "reason"], registry=registry)
        self.pending = Gauge(PENDING, "Inference requests with images waiting for a batch, by model (summed over "
                             "the server processes)", ["model"], registry=registry, multiprocess_mode="livesum")
        self.metrics = (self.requests, self.durations, self.inferences, self.batches, self.batch_durations,
                        self.last_inference, self.failures, self.pending)
        self.waiting: set[str] = set()  # the models whose pending count this process last set above 0

    def succeeded(self, model: str, images: int, total_s: float, queue_s: float, infer_s: float,
                  input_s: float) -> None:
        for name, seconds in (("success", total_s), ("queue", queue_s), ("compute_infer", infer_s),
                              ("compute_input", input_s)):
            self.durations.labels(model, name).inc(nanoseconds(seconds))
        self.inferences.labels(model).inc(images)
        self.last_inference.labels(model).set(int(time.time() * 1000))
        self.requests.labels(model, "success").inc()

    def failed(self, model: str, total_s: float, reason: str = "OTHER") -> None:
        self.durations.labels(model, "fail").inc(nanoseconds(total_s))
        self.requests.labels(model, "fail").inc()
        self.failures.labels(model, reason).inc()

    def waiting_requests(self, by_model: dict[str, int]) -> None:
        """How many of each model's requests have images in this process's queue now."""
        for model in self.waiting - by_model.keys():
            self.pending.labels(model).set(0)
        for model, count in by_model.items():
            self.pending.labels(model).set(count)
        self.waiting = {model for model, count in by_model.items() if count}

    def executed(self, model: str, images: int, seconds: float) -> None:
        """A batch computed in `seconds` that held `images` of the model's images."""
        self.batch_durations.labels(model, str(images)).inc(nanoseconds(seconds))
        self.batches.labels(model, str(images)).inc()

    def values(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of these metrics, by name and labels: the sums over the server's processes
        where they share a folder, else this process's."""
        folder = shared_folder()
        if folder:
            files = [path for pattern in FILES for path in glob.glob(os.path.join(folder, pattern))]
            families = MultiProcessCollector.merge(files)
        else:
            families = [family for metric in self.metrics for family in metric.collect()]
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in families for sample in family.samples if sample.name in SAMPLES}

    def as_triton_metrics(self, models: list[str], version: str) -> str:
        """Triton's per-model Prometheus metrics (nv_inference_*) in the text format."""
        return triton_metrics(self.values(), models, version)

    def as_json(self, models: list[str], version: str) -> dict:
        """Triton's JSON answer for `models`."""
        values = self.values()
        return {"model_stats": [model_json(values, model, version) for model in models]}


def model_json(values: dict[tuple[str, frozenset], float], model: str, version: str) -> dict:
    """Triton's JSON form of one model's statistics, from Statistics.values()."""

    def value(sample: str, **labels: str) -> int:
        return round(values.get((sample, frozenset({"model": model, **labels}.items())), 0))

    def duration(count: int, ns: int = 0) -> dict:
        return {"count": count, "ns": ns}

    successes = value(f"{REQUESTS}_total", outcome="success")
    stats = {name: duration(value(f"{REQUESTS}_total", outcome="fail") if name == "fail" else successes,
                            value(f"{DURATIONS_NS}_total", duration=name)) for name in DURATIONS}
    stats.update({name: duration(0) for name in NO_CACHE})
    sizes = sorted(int(dict(labels)["batch_size"]) for sample, labels in values
                   if sample == f"{BATCHES}_total" and ("model", model) in labels)
    batch_stats = []
    for size in sizes:
        count = value(f"{BATCHES}_total", batch_size=str(size))
        batch_stats.append({"batch_size": size, "compute_input": duration(count),
                            "compute_infer": duration(count, value(f"{BATCH_NS}_total", batch_size=str(size))),
                            "compute_output": duration(count)})
    return {"name": model, "version": version, "last_inference": value(LAST_INFERENCE),
            "inference_count": value(f"{INFERENCES}_total"),
            "execution_count": sum(entry["compute_infer"]["count"] for entry in batch_stats),
            "inference_stats": stats, "batch_stats": batch_stats}


# Triton's Prometheus counters (its /metrics, port 8002 there), each read, as Triton's are, from the
# model's statistics (model_json): (metric, help, the figure).
def _microseconds(key: str):
    return lambda stats: stats["inference_stats"][key]["ns"] / 1000


TRITON_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda stats: stats["inference_stats"]["success"]["count"]),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     lambda stats: stats["inference_count"]),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     lambda stats: stats["execution_count"]),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (includes cached "
     "requests)", _microseconds("success")),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds (includes cached "
     "requests)", _microseconds("queue")),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds (does not "
     "include cached requests)", _microseconds("compute_input")),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds (does not "
     "include cached requests)", _microseconds("compute_infer")),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds "
     "(does not include cached requests)", _microseconds("compute_output")),
)


def triton_metrics(values: dict[tuple[str, frozenset], float], models: list[str], version: str) -> str:
    """Triton's per-model inference metrics in Prometheus' text format, from Statistics.values(), as
    Triton writes them (counters named without `_total`, durations in µs, labels model and version;
    failures by reason): dashboards, alerts and autoscalers written against Triton read this /metrics
    unchanged. The pending count is of requests with images waiting for a batch (Triton's also counts
    a request from its arrival); GPU and CPU metrics (nv_gpu_*, nv_cpu_*) are not given."""
    stats = {model: model_json(values, model, version) for model in models}

    def line(name: str, labels: dict, number: float) -> str:
        text = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
        return f"{name}{{{text}}} {round(number)}\n"

    def family(name: str, help_: str, kind: str, lines: list[str]) -> list[str]:
        return [f"# HELP {name} {help_}\n", f"# TYPE {name} {kind}\n", *lines]

    def of(model: str, **labels: str) -> dict:
        return {"model": model, "version": version, **labels}

    out = []
    for name, help_, figure in TRITON_COUNTERS:
        out += family(name, help_, "counter", [line(name, of(m), figure(stats[m])) for m in models])
    out += family("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "counter",
                  [line("nv_inference_request_failure", of(m, reason=reason),
                        values.get((f"{FAILURES}_total", frozenset({"model": m, "reason": reason}.items())), 0))
                   for m in models for reason in REASONS])
    out += family("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting "
                  "execution per-model.", "gauge",
                  [line("nv_inference_pending_request_count", of(m),
                        values.get((PENDING, frozenset({"model": m}.items())), 0)) for m in models])
    return "".join(out)
