"""Provisioning: make whatever artifact a service configuration needs and is missing or stale.

    weights --(child process: python -m export onnx)--> fp32 ONNX --(child process)--> fp16 / int8 ONNX
            --(TensorRT, in this process)--> engine, verified against the reference logits

Both the container's entrypoint and `python -m service` call `provision` with the plan the
service's settings give (runtime.artifacts.ArtifactPlan), so the two ask for the same artifacts
with the same build parameters. Everything is checked first without a lock (the common case: all
current, nothing written); if something must be made, an exclusive lock on the folder it goes to
is taken and the check repeated, so that two processes or containers sharing a volume never
build at once, and every file is written whole (model/files.py). The Paddle export runs in a
child process, so that no serving process ever holds Paddle (~600 MB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from export.errors import ExportError
from model.files import exclusive, remove_leftovers
from runtime.artifacts import SOURCE_DIGEST, ArtifactPlan, engine_status, onnx_staleness

LOCK_NAME = ".provision.lock"


def pending(plan: ArtifactPlan, force_engine: bool = False) -> list[tuple[str, str]]:
    """(artifact, why it must be made) for each artifact of the plan that is missing or stale, in order."""
    steps = []
    why = onnx_staleness(plan.onnx, plan.weights)
    if why:
        steps.append(("onnx", why))
    if plan.precision != "fp32":
        why = "its fp32 ONNX is made first" if steps else onnx_staleness(plan.onnx_for_precision, plan.onnx, SOURCE_DIGEST)
        if why:
            steps.append((plan.precision, why))
    if plan.backend == "tensorrt":
        if force_engine:
            steps.append(("engine", "rebuild forced"))
        elif steps:
            steps.append(("engine", "its ONNX is made first"))
        else:
            ok, why = engine_status(plan.engine, plan.onnx_for_precision, plan.engine_spec)
            if not ok:
                steps.append(("engine", why))
    return steps


def provision(plan: ArtifactPlan, force_engine: bool = False, progress: bool = True, log=print) -> list[str]:
    """Make what the plan needs; returns what was done (empty when everything was current).

    ExportError naming the artifact and the cause when something cannot be made, or when it is
    missing or stale and plan.rebuild is off.
    """
    steps = pending(plan, force_engine)
    if not steps:
        return []
    if not plan.rebuild:
        artifact, why = steps[0]
        raise ExportError(f"{why}; make it with `python -m service --provision-only` or set ACMIX_REBUILD=true")
    lock_folder = (plan.engine if any(a == "engine" for a, _ in steps) else plan.onnx).parent
    done = []
    with exclusive(lock_folder / LOCK_NAME):
        for target in {plan.onnx, plan.onnx_for_precision, *([plan.engine] if plan.engine else [])}:
            for tmp in remove_leftovers(target):  # of a provisioning killed mid-write (docker stop, OOM)
                log(f"provisioning: removed {tmp}, left by an interrupted write")
        for artifact, why in pending(plan, force_engine):  # again: another process may have made them
            log(f"provisioning: {why}: making the {artifact} artifact")
            if artifact == "onnx":
                if not Path(plan.weights).is_file():
                    raise ExportError(f"{plan.onnx} is missing and there are no weights at {plan.weights} to export")
                export_in_child(["onnx", "--weights", str(plan.weights), "--out", str(plan.onnx)])
                done.append(f"exported {plan.onnx}")
            elif artifact == "engine":
                done.append(build_verified_engine(plan, progress))
            else:
                export_in_child(["onnx", "--precision", artifact, "--from-onnx", str(plan.onnx),
                                 "--out", str(plan.onnx_for_precision)])
                done.append(f"made {plan.onnx_for_precision}")
    return done


def export_in_child(arguments: list[str]) -> None:
    """`python -m export ARGUMENTS` in a child process (Paddle and the ONNX tools stay out of this
    one); ExportError with its last error line if it fails."""
    command = [sys.executable, "-m", "export", *arguments]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        raise ExportError(f"`python -m export {' '.join(arguments)}` failed: {last.removeprefix('error: ')}")


def build_verified_engine(plan: ArtifactPlan, progress: bool = True) -> str:
    """Build the plan's engine and verify it against the reference logits of its fp32 ONNX."""
    from export.engine import make_engine
    from export.verify import verify_engine

    def check(engine_path: Path) -> dict:
        return verify_engine(engine_path, plan.onnx, plan.precision)

    make_engine(plan.onnx_for_precision, plan.engine, plan.engine_spec, check, plan.timing_cache, progress)
    return f"built and verified {plan.engine}"
