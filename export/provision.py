"""Provisioning: make whatever artifact a service configuration needs and is missing or stale.

    weights --(child process: python -m export onnx)--> fp32 ONNX --(child process)--> fp16 / int8 ONNX
            --(child process: python -m export engine)--> engine, verified against the reference logits

Both the container's entrypoint and `python -m service` call `provision` with the plan the
service's settings give (runtime.artifacts.ArtifactPlan), so the two ask for the same artifacts
with the same build parameters. Everything is checked first without a lock (the common case: all
current, nothing written); if something must be made, an exclusive lock on every folder it writes
in is taken (the same lock a manual `python -m export` takes) and the check repeated, so that two processes or containers sharing a volume never
build at once, and every file is written whole (model/files.py). Every step runs in a child
process: no serving process (nor the supervisor of several) ever holds Paddle (~600 MB) or the
CUDA context and TensorRT builder of an engine build, and a SIGTERM during a build (`docker stop`
on a first start) stops it at once, since the child is killed on the way out, where a build in
this process would only see the signal once TensorRT returned. The engine build's progress is
passed through to this process's stderr.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from export.errors import ExportError
from model.files import blocking_file, exclusive, remove_leftovers
from runtime.artifacts import DERIVED_FORMS, SOURCE_DIGEST, ArtifactPlan, engine_status, onnx_staleness

LOCK_NAME = ".provision.lock"
# Names the lock a provisioning holds for the exports it runs in children, which would otherwise wait
# for it (artifact_lock).
LOCK_HELD = "ACMIX_PROVISION_LOCK_HELD"
TAIL_BYTES = 8192  # of a child's stderr, kept for its error line


def pending(plan: ArtifactPlan, force_engine: bool = False) -> list[tuple[str, str]]:
    """(artifact, why it must be made) for each artifact of the plan that is missing or stale, in order."""
    steps = []
    why = onnx_staleness(plan.onnx, plan.weights)
    if why:
        steps.append(("onnx", why))
    if plan.precision != "fp32":
        why = "its fp32 ONNX is made first" if steps else onnx_staleness(
            plan.onnx_for_precision, plan.onnx, SOURCE_DIGEST, DERIVED_FORMS.get(plan.precision))
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
    targets = {plan.onnx, plan.onnx_for_precision, *([plan.engine] if plan.engine else [])}
    # The lock of every folder written or cleaned here, in one order (no two provisionings wait on each
    # other); the exports run in children are told they are held.
    locks = sorted({(target.parent / LOCK_NAME).resolve() for target in targets})
    held = {LOCK_HELD: os.pathsep.join(map(str, locks))}
    done = []
    with contextlib.ExitStack() as stack:
        for lock in locks:
            try:
                stack.enter_context(exclusive(lock))
            except OSError as exc:  # a read-only folder, a file where a folder should be: one line, not a traceback
                blocking = blocking_file(lock)
                where = f"{blocking} is a file, not a folder" if blocking else f"{lock.parent}: {exc.strerror or exc}"
                raise ExportError(f"{steps[0][1]}, and it cannot be made there: {where}") from None
        for target in targets:
            for tmp in remove_leftovers(target):  # of a provisioning killed mid-write (docker stop, OOM)
                log(f"provisioning: removed {tmp}, left by an interrupted write")
        for artifact, why in pending(plan, force_engine):  # again: another process may have made them
            log(f"provisioning: {why}: making the {artifact} artifact")
            if artifact == "onnx":
                if not Path(plan.weights).is_file():
                    raise ExportError(f"{plan.onnx} is missing and there are no weights at {plan.weights} to export")
                export_in_child(["onnx", "--weights", str(plan.weights), "--out", str(plan.onnx)], env=held)
                done.append(f"exported {plan.onnx}")
            elif artifact == "engine":
                export_in_child(engine_arguments(plan), echo=progress, env=held)
                done.append(f"built and verified {plan.engine}")
            else:
                export_in_child(["onnx", "--precision", artifact, "--from-onnx", str(plan.onnx),
                                 "--out", str(plan.onnx_for_precision)], env=held)
                done.append(f"made {plan.onnx_for_precision}")
    return done


def export_in_child(arguments: list[str], echo: bool = False, env: dict[str, str] | None = None) -> None:
    """`python -m export ARGUMENTS` in a child process (Paddle, TensorRT and the ONNX tools stay out
    of this one), with `env` added to this process's environment; see run_child."""
    run_child([sys.executable, "-m", "export", *arguments], f"`python -m export {' '.join(arguments)}`", echo,
              {**os.environ, **env} if env else None)


def artifact_lock(folder: str | Path):
    """The lock under which an artifact is made in `folder`: provisioning's, so that a manual
    `python -m export` and a service's provisioning never make the same file at once; none to take
    where this process is the child of a provisioning that holds it (LOCK_HELD)."""
    lock = (Path(folder) / LOCK_NAME).resolve()
    held = os.environ.get(LOCK_HELD, "").split(os.pathsep)
    return contextlib.nullcontext() if str(lock) in held else exclusive(lock)


def run_child(command: list[str], name: str, echo: bool = False, env: dict[str, str] | None = None) -> None:
    """Run `command` (in `env`, default this process's environment), its stderr passed through to
    this process's where `echo`; ExportError naming it with its last error line if it fails. The
    child is killed if this process is interrupted meanwhile (SIGTERM raised as SystemExit, Ctrl-C)."""
    tail = bytearray()
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as child:
        try:
            while chunk := os.read(child.stderr.fileno(), 1 << 16):
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()
                tail = (tail + chunk)[-TAIL_BYTES:]
            child.wait()
        except BaseException:
            child.kill()
            raise
    if child.returncode != 0:
        lines = [line for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        raise ExportError(f"{name} failed: {last.removeprefix('error: ')}")


def engine_arguments(plan: ArtifactPlan) -> list[str]:
    """`python -m export engine` arguments that build the plan's engine, verified against the
    reference logits of its fp32 ONNX (rebuilt even where the file is current: provisioning
    decided it must be made)."""
    spec = plan.engine_spec
    return ["engine", "--onnx", str(plan.onnx), "--precision", spec.precision, "--engine", str(plan.engine),
            "--min-batch", str(spec.min_batch), "--opt-batch", str(spec.opt_batch), "--max-batch", str(spec.max_batch),
            "--workspace-mib", str(spec.workspace_mib), "--timing-cache", str(plan.timing_cache or ""), "--force"]
