#!/bin/sh
# Entrypoint of both images (docker/Dockerfile.gpu, docker/Dockerfile.cpu). Settings come from the
# ACMIX_ environment variables (service/settings.py); the defaults below are the service's own.
#
#   serve (default)   export the ONNX if it is missing or from other weights, build the TensorRT engine if it is missing
#                     or stale (TensorRT backend only), then run the service
#   onnx              only the ONNX step
#   engine [OPTION]   the ONNX step, then `python -m export engine` with extra options (e.g. --force)
#   anything else     run as given (e.g. `sh`, `python -m export verify --onnx ...`)
set -eu

: "${ACMIX_BACKEND:=auto}"
: "${ACMIX_WEIGHTS_PATH:=model/weights/alexnet_acmix.pdparams}"
: "${ACMIX_ONNX_PATH:=build/alexnet_acmix.onnx}"
: "${ACMIX_ENGINE_PATH:=build/alexnet_acmix.fp32.plan}"
: "${ACMIX_ENGINE_PRECISION:=fp32}"
: "${ACMIX_ENGINE_REBUILD:=true}"
: "${ACMIX_MAX_BATCH_SIZE:=32}"
: "${ACMIX_HOST:=0.0.0.0}"
: "${ACMIX_PORT:=8000}"

log() {
    echo "entrypoint: $*" >&2
}

# The ONNX model, exported from the shipped Paddle weights (and verified against Paddle) when it is
# missing or was exported from other weights (an image with new weights over an old volume).
prepare_onnx() {
    python -m export onnx --weights "$ACMIX_WEIGHTS_PATH" --out "$ACMIX_ONNX_PATH" --if-stale
}

# `python -m export engine` calls export.engine.ensure_engine with rebuild=True: an engine that
# exists and whose metadata (<engine>.json) matches this ONNX file (sha256), this TensorRT version,
# this GPU (name and compute capability), the precision and a batch profile up to --max-batch is
# kept as it is; a missing or stale one is rebuilt (a few minutes; progress bars go to the log).
# --force rebuilds in any case. The timing cache lives beside the engine, in the same volume.
build_engine() {
    python -m export engine --onnx "$ACMIX_ONNX_PATH" --engine "$ACMIX_ENGINE_PATH" \
        --precision "$ACMIX_ENGINE_PRECISION" --opt-batch "$ACMIX_MAX_BATCH_SIZE" \
        --timing-cache "$(dirname "$ACMIX_ENGINE_PATH")/timing.cache" "$@"
}

# pydantic's spellings of true, as the service reads ACMIX_ENGINE_REBUILD.
is_true() {
    case "$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')" in
        1 | true | t | yes | y | on) return 0 ;;
        *) return 1 ;;
    esac
}

tensorrt_usable() {
    python -c 'import sys; from export.engine import tensorrt_status; sys.exit(0 if tensorrt_status()[0] else 1)'
}

serve() {
    prepare_onnx
    case "$ACMIX_BACKEND" in
        onnxruntime)
            ;;
        tensorrt | auto)
            if [ "$ACMIX_BACKEND" = auto ] && ! tensorrt_usable; then
                log "backend auto: no usable TensorRT and GPU, the service picks ONNX Runtime"
            elif is_true "$ACMIX_ENGINE_REBUILD"; then
                build_engine
            else
                # The service checks the engine itself and refuses to start on a stale one.
                log "ACMIX_ENGINE_REBUILD=$ACMIX_ENGINE_REBUILD: not building $ACMIX_ENGINE_PATH"
            fi
            ;;
        *)
            log "unknown ACMIX_BACKEND=$ACMIX_BACKEND (auto, onnxruntime or tensorrt)"
            exit 2
            ;;
    esac
    exec python -m service --host "$ACMIX_HOST" --port "$ACMIX_PORT"
}

command="${1:-serve}"
case "$command" in
    serve)
        serve
        ;;
    onnx)
        prepare_onnx
        ;;
    engine)
        shift
        prepare_onnx
        build_engine "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
