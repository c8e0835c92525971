"""The backend a plan asks for (runtime/), not yet loaded: the artifact provisioning made."""

from __future__ import annotations

from runtime.artifacts import ArtifactPlan
from runtime.backend import Backend, BackendError

# fp16 on ONNX Runtime's CPU provider: no fp16 kernels for these convolutions, so it would cast
# back to fp32 around every node and run slower than fp32.
CPU_FP16 = "ONNX Runtime runs fp16 on the CPU slower than fp32 (no fp16 convolution kernels); use fp32 or int8 there"


def plan_problem(plan: ArtifactPlan) -> str | None:
    """Why the plan's backend cannot run here, or not its precision; None where it can. Checked
    before provisioning makes a file for it (or starts an engine build that cannot run), and the
    precision again when the backend is created."""
    if plan.backend == "tensorrt":
        from runtime.cuda import tensorrt_status

        available, why = tensorrt_status()
        return None if available else f"the TensorRT backend cannot run here: {why}"
    if plan.precision == "fp16":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"precision fp16: {CPU_FP16}"
    return None


def create_backend(plan: ArtifactPlan, max_batch: int, threads: int | None = None) -> Backend:
    """The backend of `plan` over its served artifact; BackendError, saying why, when that is
    missing or the backend cannot run the plan's precision."""
    if plan.backend == "onnxruntime" and (problem := plan_problem(plan)):
        raise BackendError(problem)
    if not plan.served.is_file():
        raise BackendError(f"{plan.served} is missing; `python -m service` makes it at start "
                           "(or `python -m service --provision-only`)")
    if plan.backend == "onnxruntime":
        from runtime.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(plan.served, max_batch, threads)
    from runtime.tensorrt import TensorRTBackend

    return TensorRTBackend(plan.served, max_batch)
