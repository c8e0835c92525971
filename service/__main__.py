"""python -m service [--host H] [--port P] [--grpc-port G] [--workers N] [--provision-only [--force-engine]]

Makes the artifacts the settings need and are missing or stale (export/provision.py: the ONNX
from the weights in a child process, the TensorRT engine from the ONNX), then runs the service
under uvicorn (settings: service/settings.py), in one process or, with --workers N (ACMIX_WORKERS),
in N worker processes sharing the ports under a supervisor (service/workers.py). The container's
entrypoint runs exactly this. --provision-only stops after the artifacts (e.g. `docker compose run
--rm export`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time

import uvicorn
from pydantic import ValidationError

from export.errors import ExportError
from export.provision import provision
from service.backends import plan_problem
from service.main import create_app, drain_seconds, http_drain_seconds
from service.settings import Settings, address, settings_problem, unknown_variables

log = logging.getLogger("service")


# Signals this close after the first are the same stop (ACMIX_SHUTDOWN_DELAY_S's "second signal" is not).
SAME_SIGNAL_S = 1.0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness goes false first; uvicorn then stops accepting connections,
    finishes the requests in flight, and the lifespan drains the batcher. With
    ACMIX_SHUTDOWN_DELAY_S, requests are still served for that long with readiness false before
    the drain (a second signal drains at once): a load balancer that has not yet seen the 503s
    still sends some, which a closed port would refuse."""

    def __init__(self, config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame):
        delay = self.state.settings.shutdown_delay_s
        self.state.peers.mark_not_ready()
        if delay and not (self.state.stopping or self.state.draining):
            self.state.stopping, self.first_signal = True, time.monotonic()
            log.info("signal %d: not ready; requests still served for %g s, then the drain", sig, delay)
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(loop.call_later, delay, self._after_the_delay, sig, frame)
            return
        if self.state.stopping and not self.state.draining and time.monotonic() - self.first_signal < SAME_SIGNAL_S:
            return  # the same stop again: a signal to the process group, then the supervisor's to its workers
        self.state.draining = True
        super().handle_exit(sig, frame)

    def _after_the_delay(self, sig, frame):
        if not self.state.draining:  # not drained already by a second signal (uvicorn would force the exit)
            self.state.draining = True
            super().handle_exit(sig, frame)


class OneLineLoadFailure:
    """The app as uvicorn runs it. When the backend does not load, or the gRPC port cannot be listened
    on, the lifespan has logged one line naming the cause (service/main.py) and re-raised; Starlette
    then hands uvicorn the traceback as the startup failure's message, which uvicorn would log too.
    This drops that message for those failures only: any other exception at startup keeps its
    traceback."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_without_traceback(message):
            if message["type"] == "lifespan.startup.failed" and self.state.startup_error:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_without_traceback)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_provisioning(signum, frame):
    raise SystemExit(128 + signum)


def stopped(signum, frame):
    raise SystemExit(0)


def parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Every other setting is an ACMIX_* environment variable (the README's Settings table, "
               "service/settings.py); these flags override ACMIX_HOST, ACMIX_PORT, ACMIX_GRPC_PORT and ACMIX_WORKERS.")
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--grpc-port", type=int, default=settings.grpc_port, help="the gRPC API's port (0: off)")
    parser.add_argument("--workers", default=settings.workers, help="server processes (a number, or auto)")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    parser.add_argument("--provision-only", action="store_true", help="make the artifacts, then exit")
    parser.add_argument("--force-engine", action="store_true", help="rebuild the TensorRT engine even if current")
    return parser


def main(argv=None) -> int:
    try:
        args = parser(Settings()).parse_args(argv)
        # validated again with the flags: they may clash with the environment (the same two ports)
        settings = Settings(host=args.host, port=args.port, grpc_port=args.grpc_port, workers=str(args.workers))
    except ValidationError as exc:
        print(f"error: {settings_problem(exc)}", file=sys.stderr)
        return 2
    # With several processes each line names its worker (the supervisor's own lines have none).
    worker = f" worker {args.worker_index}" if args.worker_index is not None else ""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s{worker} %(name)s: %(message)s")
    if args.worker_index is None:
        for unknown in unknown_variables(os.environ):
            log.warning("%s is not a setting; it has no effect", unknown)
    backend, reason = settings.resolved_backend()
    if args.worker_index is not None:  # a worker: the supervisor provisioned already
        from service.workers import die_with_supervisor

        die_with_supervisor()
        return serve(settings, reuse_port=True)
    plan = settings.plan(backend)
    # Before provisioning makes a file that cannot run here; --provision-only may make an fp16 ONNX for
    # another host, but no engine where TensorRT cannot run.
    if (problem := plan_problem(plan)) and not (args.provision_only and backend == "onnxruntime"):
        print(f"error: {problem} (ACMIX_BACKEND={backend}, ACMIX_PRECISION={plan.precision})", file=sys.stderr)
        return 2
    if not args.provision_only:
        from service.workers import port_problem

        for port in filter(None, (settings.port, settings.grpc_port)):
            if problem := port_problem(settings.host, port):
                print(f"error: {problem}", file=sys.stderr)
                return 2
    if args.provision_only or args.force_engine:  # asked for by name, whatever ACMIX_REBUILD says
        plan = dataclasses.replace(plan, rebuild=True)
    # SIGTERM while provisioning (docker stop during a first-start build) stops it at once, and so does
    # Ctrl-C: as an exception, on which export.provision kills the child that exports or builds (what it
    # was writing is removed at the next start), then one line, not a KeyboardInterrupt traceback.
    previous = {stop_signal: signal.signal(stop_signal, stop_provisioning) for stop_signal in STOP_SIGNALS
                if signal.getsignal(stop_signal) is not signal.SIG_IGN}  # nohup's, a background job's: kept
    try:
        for done in provision(plan, force_engine=args.force_engine, log=log.info):
            log.info("provisioning: %s", done)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code - 128 in STOP_SIGNALS:
            print(f"error: {signal.Signals(exc.code - 128).name} while provisioning: stopped", file=sys.stderr)
        raise
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)
    if args.provision_only:
        log.info("provisioning: %s is current", plan.served)
        return 0
    workers = settings.resolved_workers(backend)
    if workers > 1:
        from service.workers import PortTaken, claimed_port, supervise

        forwarded = ["--host", settings.host, "--port", str(settings.port), "--grpc-port", str(settings.grpc_port),
                     "--workers", str(workers)]
        try:
            with claimed_port(settings.host, settings.port):
                # uvicorn names its address only where it binds the socket itself (one process)
                log.info("HTTP on http://%s, %d worker processes", address(settings.host, settings.port), workers)
                return supervise(workers, forwarded, drain_seconds(settings) + 5)
        except PortTaken as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return serve(settings)


def serve(settings: Settings, reuse_port: bool = False) -> int:
    """The app under uvicorn in this process; with reuse_port on a socket the other workers share."""
    app = create_app(settings)
    config = uvicorn.Config(
        OneLineLoadFailure(app, app.state.service), host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=http_drain_seconds(settings), access_log=False,
    )
    server = DrainingServer(config, app.state.service)
    # uvicorn raises the signal it drained for again once done: to this handler, a clean stop, status
    # 0 (the default handlers made it -15, and a KeyboardInterrupt traceback after Ctrl-C). A signal
    # before uvicorn's own handlers are in stops the start the same way.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, stopped)
    try:
        if reuse_port:
            from service.workers import STARTUP_REFUSED, reuse_port_socket

            try:  # the supervisor checked the port; another program may have taken it since
                sock = reuse_port_socket(settings.host, settings.port)
            except OSError as exc:
                print(f"error: cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc})",
                      file=sys.stderr)
                return STARTUP_REFUSED
            server.run(sockets=[sock])
        else:
            server.run()
    except SystemExit:  # uvicorn's own exit at a failed startup (status 3)
        if not app.state.service.startup_error:
            raise
    if app.state.service.startup_error:  # logged in one line; a supervisor does not start it again
        from service.workers import STARTUP_REFUSED

        return STARTUP_REFUSED
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
