"""python -m export {onnx,verify,engine,all,triton}: Paddle weights -> ONNX -> TensorRT engine.

    python -m export onnx    [--weights W] [--out build/alexnet_acmix.onnx] [--if-stale]   (verifies at the end)
    python -m export verify  [--onnx O] [--weights W] [--data D]
    python -m export engine  [--onnx O] [--precision fp32|fp16] [--opt-batch 32] [--max-batch 256]
    python -m export all     weights -> ONNX -> verify -> engine where a GPU and TensorRT are present
    python -m export triton  [--onnx O] [--engine E] [--out model_repository]   (Triton model repository)

Every failure prints one line `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.errors import ExportError

DEFAULT_WEIGHTS = "model/weights/alexnet_acmix.pdparams"
DEFAULT_ONNX = "build/alexnet_acmix.onnx"
DEFAULT_DATA = "../shared/data/cifar10-train-jpeg.tar.gz"
DEFAULT_SPLIT_FILE = "model/weights/val_split.json"


def default_engine_path(onnx: str, precision: str) -> str:
    return str(Path(onnx).with_suffix(f".{precision}.plan"))


def run_onnx(args) -> dict:
    from export.onnx_export import export_onnx, onnx_staleness

    if args.if_stale:
        why = onnx_staleness(args.out, args.weights)
        if why is None:
            print(f"{args.out} is current (exported from {args.weights}); kept", file=sys.stderr)
            return {"onnx": str(args.out), "kept": True}
        print(f"{why}: exporting it", file=sys.stderr)
    path = export_onnx(args.weights, args.out, arch=args.arch)
    print(f"wrote {path}", file=sys.stderr)
    result = {"onnx": str(path)}
    if not args.no_verify:
        args.onnx = str(path)
        result["verify"] = run_verify(args)
    return result


def run_verify(args) -> dict:
    from export.verify import verification_images, verify_onnx

    split_file = args.split_file if Path(args.split_file).is_file() else None
    batch = verification_images(args.data, args.count, split_file)
    source = args.data if Path(args.data).exists() else "generated images"
    result = verify_onnx(args.onnx, args.weights, batch, arch=args.arch)
    print(
        f"verify {args.onnx}: onnx.checker ok; ONNX Runtime vs Paddle on {result['n']} images from {source}: "
        f"max |logit diff| {result['max_abs_diff']:.2e}, top-1 agreement {result['top1_agreement']:.2%}",
        file=sys.stderr,
    )
    if not result["passed"]:
        raise ExportError(
            f"{args.onnx} disagrees with Paddle: max |logit diff| {result['max_abs_diff']:.2e}, "
            f"top-1 agreement {result['top1_agreement']:.2%}"
        )
    if getattr(args, "fp16", False):
        from export.verify import verify_fp16

        result["fp16"] = verify_fp16(args.onnx, batch)
    return result


def run_engine(args) -> dict:
    from export.engine import ensure_engine, tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        raise ExportError(f"cannot build a TensorRT engine here: {reason}")
    engine = args.engine or default_engine_path(args.onnx, args.precision)
    path, how = ensure_engine(
        args.onnx,
        engine,
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
        timing_cache=args.timing_cache,
        rebuild=True,
        force=args.force,
    )
    print(f"{how}: {path}", file=sys.stderr)
    from export.verify import verification_images, verify_engine

    split_file = args.split_file if Path(args.split_file).is_file() else None
    batch = verification_images(args.data, args.count, split_file)
    return {"engine": str(path), "status": how, "verify": verify_engine(path, args.onnx, args.precision, batch)}


def run_all(args) -> dict:
    result = run_onnx(args)
    from export.engine import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        print(f"stopping after the ONNX step: {reason}", file=sys.stderr)
        result["engine"] = None
        return result
    result.update(run_engine(args))
    return result


def run_triton(args) -> dict:
    from export.triton import read_model_config, write_model_repository

    if args.engine is not None and not Path(args.engine).is_file():
        raise ExportError(f"{args.engine}: no such engine file")
    engine = args.engine or default_engine_path(args.onnx, "fp32")  # the service's default engine, if built
    path = write_model_repository(args.out, args.onnx, engine_path=engine, model_name=args.model_name,
                                  max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us,
                                  instances=args.instances, kind=args.kind)
    platform = read_model_config(path).platform
    print(f"wrote {path} ({platform})", file=sys.stderr)
    return {"model_repository": str(args.out), "platform": platform}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)

    def paddle_options(p):
        p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="Paddle .pdparams")
        p.add_argument("--arch", default="alexnet_acmix", choices=["alexnet_acmix", "alexnet"])

    def verify_options(p):
        p.add_argument("--data", default=DEFAULT_DATA, help="images to verify on (generated ones when absent)")
        p.add_argument("--split-file", default=DEFAULT_SPLIT_FILE, help="verify on these held-out images")
        p.add_argument("--count", type=int, default=256, help="how many images")
        p.add_argument("--fp16", action="store_true", help="also convert to fp16 ONNX and check it against fp32")

    def engine_options(p):
        p.add_argument("--engine", default=None, help="engine file (default: beside the ONNX, .<precision>.plan)")
        p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
        p.add_argument("--min-batch", type=int, default=1)
        p.add_argument("--opt-batch", type=int, default=32)
        p.add_argument("--max-batch", type=int, default=256)
        p.add_argument("--workspace-mib", type=int, default=2048)
        p.add_argument("--timing-cache", default="build/timing.cache")
        p.add_argument("--force", action="store_true", help="rebuild even when the engine is current")

    onnx = commands.add_parser("onnx", help="export the weights to ONNX, then verify")
    paddle_options(onnx)
    verify_options(onnx)
    onnx.add_argument("--out", default=DEFAULT_ONNX)
    onnx.add_argument("--no-verify", action="store_true")
    onnx.add_argument("--if-stale", action="store_true",
                      help="only if --out is missing or was exported from other weights (its metadata says)")

    verify = commands.add_parser("verify", help="ONNX Runtime against Paddle on real images")
    paddle_options(verify)
    verify_options(verify)
    verify.add_argument("--onnx", default=DEFAULT_ONNX)

    engine = commands.add_parser("engine", help="build a TensorRT engine from the ONNX, verify it (GPU host)")
    engine.add_argument("--onnx", default=DEFAULT_ONNX)
    engine_options(engine)
    verify_options(engine)

    everything = commands.add_parser("all", help="onnx, verify, then engine where possible")
    paddle_options(everything)
    verify_options(everything)
    everything.add_argument("--out", default=DEFAULT_ONNX)
    everything.add_argument("--no-verify", action="store_true")
    everything.add_argument("--if-stale", action="store_true", help="as for onnx")
    engine_options(everything)

    triton = commands.add_parser("triton", help="write a Triton Inference Server model repository")
    triton.add_argument("--onnx", default=DEFAULT_ONNX)
    triton.add_argument("--engine", default=None, help="TensorRT plan (default: the fp32 engine beside the ONNX, if built)")
    triton.add_argument("--out", default="model_repository")
    triton.add_argument("--model-name", default="alexnet_acmix")
    triton.add_argument("--max-batch-size", type=int, default=32)
    triton.add_argument("--queue-delay-us", type=int, default=5000)
    triton.add_argument("--instances", type=int, default=1)
    triton.add_argument("--kind", default=None, choices=["gpu", "cpu"], help="default: gpu for a plan, cpu for ONNX")
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "all":
        args.onnx = args.out
    action = {"onnx": run_onnx, "verify": run_verify, "engine": run_engine, "all": run_all,
              "triton": run_triton}[args.command]
    try:
        result = action(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
