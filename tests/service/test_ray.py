"""Ray Serve: a local Ray instance with 2 replicas of service/ray_app.py on the ONNX Runtime backend."""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from harness.server import free_port
from model.preprocessing import decode_image, preprocess
from tests.conftest import run_onnx

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_service(onnx_model):
    from ray import serve

    env = {"ACMIX_BACKEND": "onnxruntime", "ACMIX_ONNX_PATH": str(onnx_model), "ACMIX_MAX_BATCH_SIZE": "8",
           "ACMIX_WEIGHTS_PATH": "unused.pdparams",
           "ACMIX_RAY_REPLICAS": "2", "ACMIX_RAY_CPUS_PER_REPLICA": "0.5", "ACMIX_DECODE_THREADS": "1",
           "ACMIX_INTRA_OP_THREADS": "1", "ACMIX_MAX_QUEUE_DELAY_MS": "20"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_app = importlib.import_module("service.ray_app")
        serve.run(ray_app.build_app({}), name="alexnet_acmix", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_two_replicas_answer_predict_correctly_and_share_the_load(ray_service, onnx_model, cifar_like_jpegs):
    expected = run_onnx(onnx_model, np.stack([preprocess(decode_image(d)) for d in cifar_like_jpegs]))

    def post(i):
        response = httpx.post(f"{ray_service}/predict", files={"file": ("x.jpg", cifar_like_jpegs[i], "image/jpeg")},
                              timeout=60)
        return i, response

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, [i % len(cifar_like_jpegs) for i in range(60)]))
    replicas = set()
    for i, response in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["class_id"] == int(expected[i].argmax()) and body["backend"] == "onnxruntime"
        replicas.add(response.headers["x-served-by"])
    assert len(replicas) == 2
    assert httpx.get(f"{ray_service}/readyz").json()["ready"]


def test_a_replica_answers_triton_statistics(ray_service):
    """Each replica answers for itself (no folder shared between replicas), in Triton's form; Ray
    batches out of the service's sight, so no executions."""
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128], "data": [0.0] * 49152}]}
    assert httpx.post(f"{ray_service}/v2/models/alexnet_acmix/infer", json=body, timeout=60).status_code == 200
    response = httpx.get(f"{ray_service}/v2/models/stats", timeout=30)
    assert response.status_code == 200
    tensor, image = response.json()["model_stats"]
    assert (tensor["name"], image["name"]) == ("alexnet_acmix", "alexnet_acmix_image")
    assert tensor["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert tensor["execution_count"] == 0 and tensor["batch_stats"] == []


def test_a_replica_fails_rays_health_check_while_its_batches_fail_or_its_backend_hangs():
    """Ray replaces a replica whose check_health raises; it had none, so a replica whose backend hung
    stayed healthy. The replica's class over the service's state, without Ray or a backend."""
    import time
    from types import SimpleNamespace

    from service.metrics import Metrics
    from service.ray_app import Classifier, ServeBatcher
    from service.settings import Settings
    from service.state import ServiceState

    # The method on a stand-in for the replica: an instance of the ingress-wrapped class would leave
    # its async __del__ unawaited.
    check_health = Classifier.func_or_class.check_health
    replica = SimpleNamespace(batcher=ServeBatcher(batch_method=None),
                              state=ServiceState(settings=Settings(request_timeout_s=0.1, max_consecutive_failures=3),
                                                 metrics=Metrics()))
    replica.state.batcher = replica.batcher
    check_health(replica)  # healthy
    with replica.batcher.in_backend.batch(time.perf_counter() - 0.5):  # in the backend for 0.5 s > 2 x 0.1 s
        with pytest.raises(RuntimeError, match="the backend hangs"):
            check_health(replica)
    check_health(replica)  # it returned
    replica.state.consecutive_failures = 3
    with pytest.raises(RuntimeError, match="3 batches failed in a row"):
        check_health(replica)
