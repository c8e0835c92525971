"""CUDA and TensorRT on this host: whether they are usable, the GPU's properties, cuda-python calls.

As NVIDIA's samples/python/common_runtime.py: one helper (`cuda_call`) turns cuda-python's
status codes into exceptions (CudaError). cuda-python is pinned at 13 (`cuda-bindings`), whose runtime
module is `cuda.bindings.runtime`. tensorrt and cuda are imported inside the functions, so that
this module imports on a machine without either.
"""

from __future__ import annotations


def import_cudart():
    """cuda-python's CUDA runtime bindings (`cuda.bindings.runtime`: cuda-bindings 12.9.1 and later,
    whose `get_cuda_native_handle` stream_handle needs; the images pin 13.x)."""
    from cuda.bindings import runtime as cudart

    return cudart


class CudaError(RuntimeError):
    """A CUDA runtime call that failed: its error's number and name."""


def cuda_call(result):
    """Unpack a cuda-python result `(cudaError_t, *values)`: CudaError on an error, else the value(s)."""
    err, *values = result
    if err.value != 0:  # cudaSuccess is 0 in every cuda-python version
        raise CudaError(f"CUDA error {err.value} ({getattr(err, 'name', err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def stream_handle(stream) -> int:
    """The address of a cuda-python stream object, for TensorRT's execute_async_v3 (cuda-bindings 13
    deprecates int(obj) for this in favour of get_cuda_native_handle)."""
    from cuda.bindings.utils import get_cuda_native_handle

    return get_cuda_native_handle(stream)


def tensorrt_status() -> tuple[bool, str]:
    """(True, versions) when TensorRT and cuda-python import and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return False, f"TensorRT is not installed ({exc})"
    try:
        cudart = import_cudart()
    except Exception as exc:
        return False, f"cuda-python is not installed ({exc})"
    try:
        count = cuda_call(cudart.cudaGetDeviceCount())
    except Exception as exc:  # no driver, or a driver too old for this runtime
        return False, f"no CUDA GPU is visible ({exc})"
    if count < 1:
        return False, "no CUDA GPU is visible"
    return True, f"TensorRT {trt.__version__}, {count} CUDA GPU(s)"


def host_info(device: int = 0) -> dict:
    """What an engine is tied to on this host: TensorRT version, GPU name and compute capability,
    with the driver's CUDA version and the CUDA runtime version that cuda-python reports (TensorRT's
    Python API does not say which CUDA it was built against)."""
    import tensorrt as trt

    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_driver_version": cuda_version(cuda_call(cudart.cudaDriverGetVersion())),
        "cuda_python_runtime_version": cuda_version(cuda_call(cudart.cudaRuntimeGetVersion())),
    }


def cuda_version(number: int) -> str:
    """CUDA's integer version, 12040 -> "12.4"."""
    return f"{number // 1000}.{number % 1000 // 10}"
