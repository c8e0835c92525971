"""Process-wide Paddle settings: which MKL kernels run on which CPU."""

from __future__ import annotations

import os

import pytest

from model import runtime
from model.runtime import available_cores, cpu_quota

AMD_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
AMD_AVX512 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n"


@pytest.mark.parametrize("cpuinfo,expected", [
    (AMD_AVX2, "5"),     # AMD with AVX2 (e.g. Zen 2/3): MKL's AVX2 kernels instead of its generic ones
    (AMD_AVX512, "7"),   # AMD with the Xeon AVX-512 set (Zen 4/5): MKL's AVX-512 kernels
    (INTEL, None),       # Intel: MKL's own choice
    ("", None),          # unreadable or another vendor
])
def test_mkl_code_path_per_cpu(tmp_path, cpuinfo, expected):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + cpuinfo)
    assert runtime.mkl_code_path(str(path)) == expected


def test_amd_with_avx512_but_not_all_of_the_xeon_set_keeps_avx2(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AMD_AVX512.replace(" avx512bw", ""))
    assert runtime.mkl_code_path(str(path)) == "5"


@pytest.mark.parametrize("chosen,preset,expected", [
    ("7", None, "7"),
    (None, None, None),   # nothing set on Intel
    ("5", "0", "0"),      # a value the user set is kept
])
def test_the_choice_is_set_only_where_the_user_has_not(monkeypatch, chosen, preset, expected):
    monkeypatch.setattr(runtime, "mkl_code_path", lambda: chosen)
    if preset is None:
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    else:
        monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", preset)
    runtime.use_fast_mkl_kernels_on_amd()
    assert runtime.os.environ.get("MKL_DEBUG_CPU_TYPE") == expected


def test_the_cpu_is_used_when_asked_or_when_paddle_has_no_cuda(paddle):
    assert runtime.resolve_device("cpu") == ("cpu", "asked for")
    if paddle.device.is_compiled_with_cuda():
        pytest.skip("this Paddle is a CUDA build")
    device, reason = runtime.resolve_device("auto")
    assert device == "cpu" and "the installed Paddle is a CPU build" in reason
    with pytest.raises(ValueError, match="--device gpu: the installed Paddle is a CPU build"):
        runtime.resolve_device("gpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        runtime.resolve_device("tpu")


def test_the_device_is_recorded_in_the_run(paddle, tmp_path):
    from model.train import TrainConfig, train
    from tests.model.test_train import synthetic_split

    record = train(TrainConfig(epochs=1, batch_size=8, max_steps_per_epoch=1), synthetic_split(2, 0),
                   synthetic_split(1, 1), tmp_path, device="cpu")
    assert record["device"] == "cpu"


@pytest.mark.gpu
def test_training_runs_on_a_cuda_gpu(tmp_path):
    """paddlepaddle-gpu and a visible CUDA GPU: a step on the GPU, recorded as such."""
    try:
        device, reason = runtime.resolve_device("gpu")
    except ValueError as exc:
        pytest.skip(f"needs paddlepaddle-gpu and a CUDA GPU: {exc}")
    from model.train import TrainConfig, train
    from tests.model.test_train import synthetic_split

    record = train(TrainConfig(epochs=1, batch_size=8, max_steps_per_epoch=2), synthetic_split(2, 0),
                   synthetic_split(1, 1), tmp_path, device=device, device_reason=reason)
    assert record["device"] == "gpu" and record["history"][0]["train_loss"] > 0


def test_the_training_benchmark_runs_the_previous_path_with_its_own_mkl_choice(tmp_path, monkeypatch):
    """The baseline of `python -m benchmarks.paddle_acmix` is the previous code path as it ran: AVX2 on
    every AMD CPU, so that the AVX-512 choice counts as part of the speed-up it measures."""
    from benchmarks.previous_training import previous_environment

    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + AMD_AVX512)
    assert runtime.mkl_code_path(str(path)) == "7"
    assert previous_environment(str(path))["MKL_DEBUG_CPU_TYPE"] == "5"
    path.write_text("processor\t: 0\n" + INTEL)
    assert "MKL_DEBUG_CPU_TYPE" not in previous_environment(str(path))
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "0")  # the user's value, for both paths
    assert previous_environment(str(path))["MKL_DEBUG_CPU_TYPE"] == "0"


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "400000 100000\n"}, 4.0),  # cgroup v2, `docker run --cpus 4`
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # not readable: none
])
def test_the_cpu_quota_of_a_container_is_read_from_its_cgroup(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(str(tmp_path)) == quota


def test_available_cores_are_at_most_the_quota_rounded_up(tmp_path, monkeypatch):
    """A container limited to 1.5 CPUs on a 64-core host sizes its threads for 2, not 64."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cores(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == 64


def test_after_import_paddle_sigterm_stops_the_process_without_paddles_handler():
    """Paddle's C++ handler dumped a stack on SIGTERM and once deadlocked in it (malloc, from inside
    the signal): `timeout` on model.evaluate hung 10 minutes. The default action instead."""
    import signal
    import subprocess
    import sys

    child = ("import os, signal, time\nfrom model.runtime import import_paddle\nimport_paddle()\n"
             "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM
    assert "SIGTERM" not in done.stderr and "FatalError" not in done.stderr


def test_a_python_sigterm_handler_set_before_paddle_is_kept():
    import subprocess
    import sys

    child = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('handled', flush=True), sys.exit(7)))\n"
             "from model.runtime import import_paddle\nimport_paddle()\n"
             "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (7, "handled\n")
