"""Process-wide Paddle settings: which MKL kernels run on which CPU."""

from __future__ import annotations

import pytest

from model import runtime


@pytest.mark.parametrize("amd,preset,expected", [
    (True, None, "5"),      # AMD: MKL's AVX2 kernels instead of its generic ones
    (False, None, None),    # Intel and others: MKL's own choice (AVX-512 where there is one)
    (True, "0", "0"),       # a value the user set is kept
])
def test_mkl_kernel_choice(monkeypatch, amd, preset, expected):
    monkeypatch.setattr(runtime, "is_amd_cpu", lambda: amd)
    if preset is None:
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    else:
        monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", preset)
    runtime.use_fast_mkl_kernels_on_amd()
    assert runtime.os.environ.get("MKL_DEBUG_CPU_TYPE") == expected


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert runtime.is_amd_cpu(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n")
    assert not runtime.is_amd_cpu(str(cpuinfo))
    assert not runtime.is_amd_cpu(str(tmp_path / "absent"))


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
