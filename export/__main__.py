"""python -m export {onnx,verify,engine,all,triton}: Paddle weights -> ONNX -> TensorRT engine.

    python -m export onnx    [--weights W] [--out build/alexnet_acmix.onnx] [--if-stale]     fp32, verified
    python -m export onnx    --precision fp16|int8 [--from-onnx O] [--out ...]              derived, verified
    python -m export verify  [--onnx O] [--weights W] [--data D]
    python -m export engine  [--onnx O] [--precision fp32|fp16|int8] [--opt-batch 32] [--max-batch 32]
    python -m export all     weights -> ONNX -> verify -> engine where a GPU and TensorRT are present
    python -m export triton  [--onnx O] [--engine E] [--out model_repository]   (Triton model repository)

Every failure prints one line `error: ...` and exits 2. The service makes what it needs by itself
(export/provision.py); these commands are for building artifacts by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from export.errors import ExportError
from export.provision import artifact_lock
from model import paths
from model.cli import command, fail, positive_int
from model.files import staged, writable
from runtime.artifacts import PRECISIONS, EngineSpec, default_engine_path, derived_onnx_path, timing_cache_path

DEFAULT_ONNX = paths.ONNX


def data_set(args) -> str | None:
    """The images to verify (and calibrate) on: --data; None, for generated ones, where it is '' or
    the default archive is absent; ExportError for another path that does not exist (a typo must not
    turn a check on real images into one on noise)."""
    if not args.data:
        return None
    if Path(args.data).exists():
        return args.data
    if args.data != paths.DATA:
        raise ExportError(f"{args.data}: no such data set (--data '' verifies on generated images)")
    return None


def split_file(args) -> str | None:
    """The held-out split to verify on; None where the default one is absent (all images then)."""
    if Path(args.split_file).is_file():
        return args.split_file
    if args.split_file != paths.SPLIT_FILE:
        raise ExportError(f"{args.split_file}: no such split file")
    return None


def run_onnx(args) -> dict:
    if args.precision != "fp32":
        return run_derived(args)
    from export.onnx_export import export_onnx
    from runtime.artifacts import onnx_staleness

    if args.if_stale:
        why = onnx_staleness(args.out, args.weights)
        if why is None:
            print(f"{args.out} is current (exported from {args.weights}); kept", file=sys.stderr)
            return {"onnx": str(args.out), "kept": True}
        print(f"{why}: exporting it", file=sys.stderr)
    writable(args.out)  # before the export, not after it
    result = {}

    def check(made: Path) -> None:  # the written file, before it replaces --out: one that fails never does
        try:
            result["verify"] = verify_against_paddle(args, made, args.out)
        except ExportError as exc:
            raise ExportError(f"{exc}; not put in place: {args.out} is as it was") from None

    with artifact_lock(Path(args.out).parent):
        path = export_onnx(args.weights, args.out, arch=args.arch, data=data_set(args), split_file=split_file(args),
                           check=None if args.no_verify else check)
    print(f"wrote {path}", file=sys.stderr)
    args.onnx = str(path)  # what `all` goes on from
    return {"onnx": str(path), **result}


# Images the checks run on. Against Paddle the check is a max |logit diff| and 100% agreement; an
# fp16 or int8 file's is a top-1 agreement, which near 98% 256 images pin only to about 0.8
# points (int8 at 98.3% on 5,000 images measured 96.9% on 256), 1,024 to about 0.4.
VERIFY_COUNT, DERIVED_VERIFY_COUNT = 256, 1024


def run_derived(args) -> dict:
    """An fp16 or int8 ONNX from the fp32 one (--from-onnx), checked against it, and put in place only
    once it passed (as engines are: a file that failed is never left as current).

    The checks: the reference check the service runs at start (runtime/reference.py), and with a data
    set, the top-1 agreement with fp32 on held-out images. Generated noise images make no agreement
    check (their two best logits are often close: int8 agreed on 89% of them, on 98.4% of validation
    images), so without a data set the reference check is the check."""
    source = Path(args.from_onnx)
    out = Path(args.out) if args.out != DEFAULT_ONNX else derived_onnx_path(source, args.precision)
    data = data_set(args)
    with artifact_lock(writable(out).parent):
        return make_derived(args, source, out, data)


def make_derived(args, source: Path, out: Path, data: str | None) -> dict:
    """run_derived's making, checking and putting in place, under the folder's lock."""
    import export.int8
    from export.verify import verification_set, verify_derived, verify_reference

    made = staged(out)
    # A calibration made on the way waits with the file: a table whose file failed is not reused later.
    table = Path(export.int8.CALIBRATION_TABLE)
    new_table = staged(table)
    try:
        if args.precision == "fp16":
            from export.fp16 import convert_fp16

            convert_fp16(source, made)
        else:
            export.int8.quantize_int8(source, made, data=data, split_file=args.split_file,
                                      count=args.calibration_images, table_out=new_table)
        result = {"onnx": str(out), "precision": args.precision}
        if not args.no_verify:
            if data is not None:
                batch, where = verification_set(data, args.count or DERIVED_VERIFY_COUNT, split_file(args))
                result["verify"] = verify_derived(source, made, args.precision, batch)
                report(f"{out}: ONNX Runtime {args.precision} vs fp32, {where},", result["verify"])
            result["reference_check"] = check = verify_reference(made, source, args.precision)
            if check:
                print(f"verify {out}: reference check passed on {check['n']} reference images ({check['source']}): "
                      f"max |logit diff| {check['max_abs_diff']:.2e}", file=sys.stderr)
            else:  # an fp32 ONNX brought without the reference file the export writes
                print(f"{out}: no reference check (no reference file beside {source}); "
                      + ("checked by the top-1 agreement only" if data else "NOT VERIFIED: no data set either"),
                      file=sys.stderr)
    except BaseException:
        made.unlink(missing_ok=True)
        new_table.unlink(missing_ok=True)
        raise
    if new_table.exists():
        os.replace(new_table, table)
        print(f"wrote {table}", file=sys.stderr)
    os.replace(made, out)
    print(f"wrote {out}", file=sys.stderr)
    return result


def report(what: str, result: dict) -> None:
    print(f"verify {what} {result['n']} images: max |logit diff| {result['max_abs_diff']:.2e}, "
          f"top-1 agreement {result['top1_agreement']:.2%}", file=sys.stderr)


def run_verify(args) -> dict:
    return verify_against_paddle(args, args.onnx, args.onnx)


def verify_against_paddle(args, onnx_path, name) -> dict:
    """verify_onnx of the file at `onnx_path` (called `name`) on the images of the arguments, reported."""
    from export.verify import verification_set, verify_onnx

    batch, where = verification_set(data_set(args), args.count or VERIFY_COUNT, split_file(args))
    result = verify_onnx(onnx_path, args.weights, batch, arch=args.arch, name=name)
    report(f"{name}: onnx.checker ok; ONNX Runtime vs Paddle, {where},", result)
    return result


def run_engine(args) -> dict:
    from export.engine import make_engine
    from export.verify import verify_engine
    from runtime.artifacts import engine_status
    from runtime.cuda import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        raise ExportError(f"cannot build a TensorRT engine here: {reason}")
    spec = EngineSpec(args.precision, args.min_batch, args.opt_batch, args.max_batch, args.workspace_mib)
    source = derived_onnx_path(args.onnx, args.precision)
    if args.precision != "fp32" and not source.is_file():
        raise ExportError(f"{source}: missing; python -m export onnx --precision {args.precision} writes it")
    engine = Path(args.engine or default_engine_path(args.onnx, args.precision))
    ok, why = engine_status(engine, source, spec)
    if ok and not args.force:
        print(f"{why}: kept", file=sys.stderr)
        return {"engine": str(engine), "kept": True}
    print(f"{'rebuild forced' if ok else why}: building {engine}", file=sys.stderr)
    cache = timing_cache_path(engine) if args.timing_cache is None else args.timing_cache or None
    with artifact_lock(writable(engine).parent):
        metadata = make_engine(source, engine, spec, lambda path: verify_engine(path, args.onnx, args.precision),
                               timing_cache=cache)
    check = metadata["verification"]
    print(f"verified {engine} on {check['n']} reference images: max |logit diff| {check['max_abs_diff']:.2e}",
          file=sys.stderr)
    return {"engine": str(engine), "verify": check}


def run_all(args) -> dict:
    precision, args.precision = args.precision, "fp32"
    result = run_onnx(args)
    if precision != "fp32":
        args.precision, args.from_onnx, args.out = precision, args.onnx, DEFAULT_ONNX
        result[precision] = run_derived(args)
    from runtime.cuda import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        print(f"stopping before the engine: {reason}", file=sys.stderr)
        result["engine"] = None
        return result
    result.update(run_engine(args))
    return result


def run_triton(args) -> dict:
    from export.triton import read_model_config, write_model_repository
    from runtime.artifacts import engine_metadata_path, read_metadata

    if args.engine is not None and not Path(args.engine).is_file():
        raise ExportError(f"{args.engine}: no such engine file")
    if args.engine is not None and read_metadata(args.engine) is None:  # asked for: not replaced by the ONNX
        raise ExportError(f"{args.engine}: no engine metadata beside it ({engine_metadata_path(args.engine)}); "
                          "build engines with python -m export engine")
    engine = args.engine or default_engine_path(args.onnx, "fp32")  # beside the ONNX: the service's default where ACMIX_ENGINE_DIR is unset
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
        p.add_argument("--weights", default=paths.WEIGHTS, help="Paddle .pdparams")
        p.add_argument("--arch", default="alexnet_acmix", choices=["alexnet_acmix", "alexnet"])

    def verify_options(p):
        p.add_argument("--data", default=paths.DATA,
                       help="images to verify on (generated ones where the default is absent, or with '')")
        p.add_argument("--split-file", default=paths.SPLIT_FILE, help="verify on these held-out images")
        p.add_argument("--count", type=positive_int, default=None,
                       help=f"how many images (default {VERIFY_COUNT} against Paddle, {DERIVED_VERIFY_COUNT} for fp16 and int8)")

    def engine_options(p):
        defaults = EngineSpec()
        p.add_argument("--engine", default=None, help="engine file (default: beside the ONNX, .<precision>.plan)")
        p.add_argument("--precision", default="fp32", choices=PRECISIONS)
        p.add_argument("--min-batch", type=positive_int, default=defaults.min_batch)
        p.add_argument("--opt-batch", type=positive_int, default=defaults.opt_batch)
        p.add_argument("--max-batch", type=positive_int, default=defaults.max_batch)
        p.add_argument("--workspace-mib", type=positive_int, default=defaults.workspace_mib)
        p.add_argument("--timing-cache", default=None, help="default: timing.cache beside the engine (as the "
                                                            "service keeps it); '' for none")
        p.add_argument("--force", action="store_true", help="rebuild even when the engine is current")

    def onnx_options(p, precision: bool = True):
        p.add_argument("--out", default=DEFAULT_ONNX,
                       help="default build/alexnet_acmix.onnx (fp32), build/alexnet_acmix.<precision>.onnx beside --from-onnx")
        p.add_argument("--no-verify", action="store_true")
        p.add_argument("--if-stale", action="store_true",
                       help="only if --out is missing or was exported from other weights (its metadata says)")
        if precision:
            p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                           help="fp16 and int8 are made from the fp32 ONNX (--from-onnx)")
        p.add_argument("--from-onnx", default=DEFAULT_ONNX, help="the fp32 ONNX an fp16 or int8 one is made from")
        p.add_argument("--calibration-images", type=positive_int, default=512,
                       help="int8: held-out training images to calibrate on")

    onnx = commands.add_parser("onnx", help="export the weights to ONNX (or derive fp16/int8), then verify")
    paddle_options(onnx)
    verify_options(onnx)
    onnx_options(onnx)

    verify = commands.add_parser("verify", help="ONNX Runtime against Paddle on real images")
    paddle_options(verify)
    verify_options(verify)
    verify.add_argument("--onnx", default=DEFAULT_ONNX)

    engine = commands.add_parser("engine", help="build a TensorRT engine from the ONNX, verify it (GPU host)")
    engine.add_argument("--onnx", default=DEFAULT_ONNX, help="the fp32 ONNX (the engine's precision picks its derived file)")
    engine_options(engine)

    everything = commands.add_parser("all", help="onnx, verify, then engine where possible")
    paddle_options(everything)
    verify_options(everything)
    onnx_options(everything, precision=False)
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
    except (ExportError, ValueError, OSError) as exc:  # ValueError: a file that is not what it should be
        return fail(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
