"""Provisioning: what is made, once, under a lock, each step in a child process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from export.errors import ExportError
from export.provision import pending, provision
from runtime.artifacts import ArtifactPlan, EngineSpec
from runtime.cuda import tensorrt_status
from runtime.reference import reference_path

ROOT = Path(__file__).resolve().parents[2]
TRT_OK, TRT_REASON = tensorrt_status()


def plan_for(onnx: Path, weights: Path, **changes) -> ArtifactPlan:
    values = {"backend": "onnxruntime", "precision": "fp32", "weights": Path(weights), "onnx": Path(onnx)}
    values.update(changes)
    return ArtifactPlan(**values)


def copy_of(onnx_model: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = shutil.copyfile(onnx_model, folder / "alexnet_acmix.onnx")
    shutil.copyfile(reference_path(onnx_model), reference_path(out))
    return out


def test_nothing_is_pending_when_the_onnx_is_of_these_weights(onnx_model, weights):
    assert pending(plan_for(onnx_model, weights)) == []
    assert provision(plan_for(onnx_model, weights)) == []


def test_what_is_pending_and_why(onnx_model, weights, tmp_path):
    other = tmp_path / "other.pdparams"
    other.write_bytes(weights.read_bytes() + b"\0")
    assert pending(plan_for(onnx_model, other)) == [("onnx", f"{onnx_model} was made from another weights file than {other}")]
    missing = tmp_path / "none.onnx"
    assert pending(plan_for(missing, weights, precision="int8")) == [
        ("onnx", f"{missing} is missing"), ("int8", "its fp32 ONNX is made first")]
    fp16 = plan_for(onnx_model, weights, precision="fp16")
    assert pending(fp16) == [("fp16", f"{onnx_model.with_name('alexnet_acmix.fp16.onnx')} is missing")]
    engine = plan_for(onnx_model, weights, backend="tensorrt", engine=tmp_path / "m.fp32.plan",
                      engine_spec=EngineSpec("fp32", 1, 8, 8))
    (artifact, why), = pending(engine)
    assert artifact == "engine" and why == f"{tmp_path / 'm.fp32.plan'}: no engine file"
    assert pending(engine, force_engine=True) == [("engine", "rebuild forced")]


def test_without_rebuild_a_stale_artifact_is_refused_with_the_reason(onnx_model, tmp_path):
    other = tmp_path / "other.pdparams"
    other.write_bytes(b"other weights")
    with pytest.raises(ExportError, match=r"made from another weights file .*; make it with `python -m service "
                                          r"--provision-only` or set ACMIX_REBUILD=true"):
        provision(plan_for(onnx_model, other, rebuild=False))


def test_missing_onnx_and_missing_weights_is_one_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"none.onnx is missing and there are no weights at .*gone.pdparams"):
        provision(plan_for(tmp_path / "none.onnx", tmp_path / "gone.pdparams"))


def test_a_failing_child_export_names_its_error(tmp_path):
    corrupt = tmp_path / "corrupt.pdparams"
    corrupt.write_bytes(b"\0garbage")
    with pytest.raises(ExportError, match=r"`python -m export onnx .*` failed: .*corrupt.pdparams: not a Paddle"):
        provision(plan_for(tmp_path / "out" / "m.onnx", corrupt))
    assert not (tmp_path / "out" / "m.onnx").exists()


def test_the_real_export_runs_in_a_child_and_this_process_never_imports_paddle(weights, tmp_path):
    out = tmp_path / "artifacts" / "alexnet_acmix.onnx"
    program = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from export.provision import provision
        from runtime.artifacts import ArtifactPlan
        done = provision(ArtifactPlan("onnxruntime", "fp32", Path({str(weights)!r}), Path({str(out)!r})), log=lambda m: None)
        print(json.dumps({{"done": done, "paddle": "paddle" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"done": [f"exported {out}"], "paddle": False}
    assert out.is_file() and reference_path(out).is_file()
    assert pending(plan_for(out, weights)) == []


# Two processes provision the same plan at once. The export itself is a fake (this tests the lock,
# not Paddle): it sleeps, then writes the ONNX whole and logs that it ran.
RACER = """
import sys, time, shutil
from pathlib import Path
import export.provision as provision_module
from runtime.artifacts import ArtifactPlan
source, onnx, weights, log = map(Path, sys.argv[1:5])

def fake_export(arguments, echo=False, env=None):
    with open(log, "a") as f:
        f.write("export\\n")
    time.sleep(1.0)
    shutil.copyfile(source, onnx)

provision_module.export_in_child = fake_export
provision_module.onnx_staleness = lambda onnx_path, parent, key=None: None if Path(onnx_path).is_file() else "missing"
print(provision_module.provision(ArtifactPlan("onnxruntime", "fp32", weights, onnx), log=lambda m: None))
"""


def test_two_concurrent_provisioners_make_the_artifact_once(tiny_onnx, tmp_path):
    weights, log, onnx = tmp_path / "w.pdparams", tmp_path / "exports.log", tmp_path / "shared" / "m.onnx"
    weights.write_bytes(b"w")
    onnx.parent.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tiny_onnx), str(onnx), str(weights), str(log)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    assert log.read_text() == "export\n"
    assert sorted(out.strip() for out, _ in outputs) == sorted(["[]", f"['exported {onnx}']"])
    assert onnx.read_bytes() == tiny_onnx.read_bytes()


def test_temporary_files_of_an_interrupted_write_are_removed_under_the_lock(tmp_path):
    """docker stop or the OOM killer during an export leaves `replacing`'s temporary file; the next
    provisioning, holding the lock, removes it (the export itself fails here: no weights)."""
    out = tmp_path / "out"
    out.mkdir()
    left = [out / ".m.onnx.k2j3h4.tmp", out / ".m.onnx.reference.json.abc.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    other = out / ".other.onnx.x.tmp"
    other.write_bytes(b"someone else's")
    logged = []
    with pytest.raises(ExportError, match="no weights"):
        provision(plan_for(out / "m.onnx", tmp_path / "gone.pdparams"), log=logged.append)
    assert not any(path.exists() for path in left) and other.exists()
    assert sum("left by an interrupted write" in line for line in logged) == 2


def test_provisioning_takes_the_lock_of_every_folder_it_cleans_or_writes(tmp_path):
    """With the engine in a folder of its own (ACMIX_ENGINE_DIR) it locked only that one, and removed
    a running manual export's staged file beside the ONNX as a leftover."""
    import threading

    from export.provision import LOCK_NAME
    from model.files import exclusive, staged

    onnx_folder, engine_folder = tmp_path / "onnx", tmp_path / "engines"
    onnx_folder.mkdir()
    exporting = staged(onnx_folder / "m.onnx")
    exporting.write_bytes(b"a manual export's file, being written")
    plan = plan_for(onnx_folder / "m.onnx", tmp_path / "gone.pdparams", backend="tensorrt",
                    engine=engine_folder / "m.fp32.plan")
    failures = []

    def provisioning():
        try:
            provision(plan, log=lambda line: None)
        except ExportError as exc:
            failures.append(str(exc))

    with exclusive(onnx_folder / LOCK_NAME):  # as the manual export holds it
        worker = threading.Thread(target=provisioning)
        worker.start()
        worker.join(1.5)
        assert worker.is_alive() and exporting.exists()  # waits for the lock, touches nothing
    worker.join(30)
    assert failures and "no weights" in failures[0] and not exporting.exists()  # then cleans, as before


def test_the_engine_is_built_by_a_child_with_the_plans_build_parameters(tmp_path):
    from export.__main__ import parser
    from export.provision import engine_arguments

    plan = plan_for(tmp_path / "m.onnx", tmp_path / "w.pdparams", backend="tensorrt", precision="int8",
                    engine=tmp_path / "e" / "m.int8.plan", engine_spec=EngineSpec("int8", 1, 8, 16, 512),
                    timing_cache=tmp_path / "e" / "timing.cache")
    args = parser().parse_args(engine_arguments(plan))
    assert args.command == "engine"
    assert (args.onnx, args.engine, args.timing_cache) == (str(plan.onnx), str(plan.engine), str(plan.timing_cache))
    assert EngineSpec(args.precision, args.min_batch, args.opt_batch, args.max_batch, args.workspace_mib) == plan.engine_spec
    assert args.force  # provisioning decided under its lock that the engine must be made
    no_cache = parser().parse_args(engine_arguments(plan_for(tmp_path / "m.onnx", tmp_path / "w", backend="tensorrt",
                                                             engine=tmp_path / "m.plan")))
    assert no_cache.timing_cache == ""  # read as none


@pytest.mark.skipif(TRT_OK, reason="TensorRT runs here: the gpu test below builds for real")
def test_provisioning_an_engine_where_tensorrt_cannot_run_fails_in_the_child_with_its_reason(onnx_model, tmp_path):
    onnx = copy_of(onnx_model, tmp_path / "a")
    plan = plan_for(onnx, tmp_path / "unused.pdparams", backend="tensorrt", engine=tmp_path / "a" / "m.plan")
    with pytest.raises(ExportError, match=r"`python -m export engine --onnx .* --force` failed: cannot build a "
                                          r"TensorRT engine here: "):
        provision(plan, log=lambda m: None)
    assert not plan.engine.exists()


def test_a_childs_stderr_is_passed_through_and_its_error_line_named(capfd):
    from export.provision import run_child

    script = "import sys; sys.stderr.write('build 50%\\rbuild 100%\\n'); sys.stderr.write('error: out of memory\\n'); sys.exit(3)"
    with pytest.raises(ExportError, match=r"^the builder failed: out of memory$"):
        run_child([sys.executable, "-c", script], "the builder", echo=True)
    assert "build 50%\rbuild 100%" in capfd.readouterr().err
    with pytest.raises(ExportError, match="out of memory"):
        run_child([sys.executable, "-c", script], "the builder")
    assert capfd.readouterr().err == ""


def test_an_interrupted_provisioning_kills_its_child_at_once(tmp_path):
    """SIGTERM during a first-start build: the service's handler raises SystemExit, and the child
    (a sleeper standing in for a long TensorRT build) is killed, not waited for."""
    import os
    import signal
    import time

    from export.provision import run_child

    pid_file = tmp_path / "child.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(2)
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit):
            run_child([sys.executable, "-c", sleeper], "the build")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_provisioning_builds_and_verifies_the_engine_in_a_child_and_this_process_never_loads_tensorrt(onnx_model,
                                                                                                      tmp_path):
    onnx = copy_of(onnx_model, tmp_path / "a")
    engine = tmp_path / "a" / "alexnet_acmix.fp32.plan"
    program = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from export.provision import provision
        from runtime.artifacts import ArtifactPlan, EngineSpec
        plan = ArtifactPlan("tensorrt", "fp32", Path("unused"), Path({str(onnx)!r}), engine=Path({str(engine)!r}),
                            engine_spec=EngineSpec("fp32", 1, 8, 8, 1024), timing_cache=Path({str(engine.parent)!r}) / "t.cache")
        done = provision(plan, log=lambda m: None)
        print(json.dumps({{"done": done, "tensorrt": "tensorrt" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"done": [f"built and verified {engine}"],
                                                                 "tensorrt": False}
    from runtime.artifacts import engine_status

    assert engine_status(engine, onnx, EngineSpec("fp32", 1, 8, 8, 1024))[0]


@pytest.mark.skipif(TRT_OK, reason="TensorRT runs here: the gpu test above builds through the child for real")
def test_the_engine_command_runs_without_paddle_as_in_the_runtime_images(tiny_onnx, tmp_path):
    """The runtime images have no Paddle and no paddle2onnx; provisioning's engine child imports neither
    (here it stops where TensorRT is missing, past every import of the engine path)."""
    program = textwrap.dedent(f"""
        import sys
        sys.modules.update(paddle=None, paddle2onnx=None)  # importing either raises
        from export.__main__ import main
        sys.exit(main(["engine", "--onnx", {str(tiny_onnx)!r}, "--engine", {str(tmp_path / "m.plan")!r}, "--force"]))
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot build a TensorRT engine here" in result.stderr, result.stderr


def test_a_folder_where_nothing_can_be_made_is_one_error_line_not_an_oserror(weights, tmp_path):
    """Its lock could not be created: an OSError traceback out of `python -m service` (a read-only
    volume takes the same way; root ignores permissions, so a file stands where the folder should be)."""
    (tmp_path / "a_file").write_text("x")
    onnx = tmp_path / "a_file" / "alexnet_acmix.onnx"
    with pytest.raises(ExportError, match=f"^{onnx} is missing, and it cannot be made there: "
                                          f"{tmp_path / 'a_file'} is a file, not a folder$"):
        provision(plan_for(onnx, weights), log=lambda m: None)
