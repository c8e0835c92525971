#!/bin/sh
# Entrypoint of both images (docker/Dockerfile). Settings come from the ACMIX_ environment variables
# (service/settings.py); provisioning and serving are `python -m service`'s, as everywhere else.
#
#   serve (default)          make what is missing or stale (export/provision.py: the TensorRT engine
#                            at the first start on a GPU), then run the service
#   provision [--force-engine]  only make the artifacts (e.g. `docker compose run --rm export`)
#   --option ...             serve with these options (e.g. `--workers 4`)
#   anything else            run as given (e.g. `sh`)
#
# exec: python becomes the container's main process (under compose's `init: true`), so SIGTERM
# reaches it directly: during provisioning it stops the build, while serving it drains.
set -eu

command="${1:-serve}"
case "$command" in
    serve)
        [ "$#" -gt 0 ] && shift
        exec python -m service "$@"
        ;;
    provision)
        shift
        exec python -m service --provision-only "$@"
        ;;
    -*)
        # options alone (`docker run IMAGE --workers 4`) are the service's
        exec python -m service "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
