"""Several server processes on one host: `python -m service --workers N` (ACMIX_WORKERS).

One process's event loop tops out at 450-725 single-image requests a second (HTTP and decoding), far
below what a GPU engine computes, so on a GPU host N processes share the HTTP and gRPC ports
(SO_REUSEPORT: the kernel spreads connections over them), each with its own batcher and backend
(on a GPU, its own TensorRT execution context on the same GPU; on a CPU host, ONNX Runtime threads
divided so that processes x threads never exceeds the cores: Settings.threads_per_batch).

The process `python -m service` started provisions the artifacts once, before any worker starts
(service/__main__.py), then supervises them (this module's `supervise`); workers only load the
artifacts. The supervisor restarts a worker that
dies, unless it could not start for a cause every worker shares (status STARTUP_REFUSED: a
precision the backend cannot run, a port another program holds) or it failed to start STARTUP_FAILURES times in a row; on
SIGTERM it passes the signal to every worker, each of which drains as one process does, then exits
when they have. They share a folder: `metrics/` for prometheus_client's multiprocess
mode (every worker's /metrics and Triton's statistics, service/statistics.py, count all of them,
those that exited included), and `ready/<index>` where each worker writes its pid once it is
loaded, warmed up and checked: a worker's readiness is true only while every index's file is there
with a live process (`Peers`), so readiness waits for all of them and dips while one is being
replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("service.workers")
INDEX_ENV = "ACMIX_WORKER_INDEX"
COUNT_ENV = "ACMIX_WORKER_COUNT"
FOLDER_ENV = "ACMIX_WORKER_FOLDER"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own
# A worker that exits this many times in a row before it ever became ready stops the supervisor.
STARTUP_FAILURES = 3
# A worker's exit status when it cannot start for a cause every worker shares: its backend refused to
# load (a BackendError: an unsupported precision, a missing or foreign artifact, a failed reference
# check), or a port it cannot listen on. The supervisor stops at the first instead of retrying.
# sysexits.h's EX_CONFIG.
STARTUP_REFUSED = 78


@dataclass(frozen=True)
class Peers:
    """This process's place among the server processes (index None, count 1: the only one)."""

    index: int | None = None
    count: int = 1
    folder: Path | None = None

    @classmethod
    def from_env(cls) -> Peers:
        if INDEX_ENV not in os.environ:
            return cls()
        return cls(int(os.environ[INDEX_ENV]), int(os.environ[COUNT_ENV]), Path(os.environ[FOLDER_ENV]))

    def ready_file(self, index: int) -> Path:
        """Where worker `index` marks itself ready (the supervisor reads and removes it too)."""
        return self.folder / "ready" / str(index)

    def mark_ready(self) -> None:
        if self.index is not None:
            path = self.ready_file(self.index)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, path)

    def mark_not_ready(self) -> None:
        if self.index is not None:
            self.ready_file(self.index).unlink(missing_ok=True)

    def all_ready(self) -> bool:
        """True when every worker has marked itself ready and is alive (always, for a single process)."""
        if self.index is None:
            return True
        for index in range(self.count):
            try:
                pid = int(self.ready_file(index).read_text())
                os.kill(pid, 0)
            except (OSError, ValueError):
                return False
        return True


def die_with_supervisor() -> None:
    """In a worker: SIGTERM (a drain) when the supervisor dies, even by SIGKILL or the OOM killer,
    instead of serving on as an orphan that shares the port (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import ctypes.util

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class PortTaken(Exception):
    """Another supervisor of this host serves the port."""


@contextlib.contextmanager
def claimed_port(host: str, port: int):
    """Held while a supervisor runs: a second `python -m service --workers N` on the same port stops
    here, instead of sharing the port with the first, as SO_REUSEPORT would let its workers do
    (the kernel would split the connections between two services). The lock file is removed on
    release, while still locked; whoever opened it before and locks it after finds that the path
    names another file (or none) and tries again on the path's."""
    path = Path(tempfile.gettempdir()) / f"acmix-service-{host}-{port}.lock"
    while True:
        handle = open(path, "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise PortTaken(f"another python -m service --workers serves {host}:{port} (lock {path})") from None
        if _same_file(path, handle):
            break
        handle.close()  # the holder before removed it: a lock on it locks out nobody
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _same_file(path: Path, handle) -> bool:
    try:
        named, held = path.stat(), os.fstat(handle.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def worker_command(index: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "service", *argv, "--worker-index", str(index)]


def supervise(count: int, argv: list[str], drain_s: float) -> int:
    """Run `count` workers until SIGTERM or SIGINT, restarting any that dies; 0 after a clean stop."""
    folder = Path(tempfile.mkdtemp(prefix="acmix-workers-"))
    (folder / "metrics").mkdir()
    (folder / "ready").mkdir()
    env = {**os.environ, COUNT_ENV: str(count), FOLDER_ENV: str(folder), METRICS_ENV: str(folder / "metrics")}
    stopping, signals = False, 0
    workers: dict[int, subprocess.Popen] = {}

    def stop(signum, frame):
        nonlocal stopping, signals
        stopping, signals = True, signals + 1
        if signals > 1:  # passed on: a worker's second signal drains it at once (ACMIX_SHUTDOWN_DELAY_S)
            for process in workers.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def spawn(index: int) -> subprocess.Popen:
        return subprocess.Popen(worker_command(index, argv), env={**env, INDEX_ENV: str(index)})

    workers.update({index: spawn(index) for index in range(count)})
    failures = dict.fromkeys(workers, 0)  # exits in a row before becoming ready
    was_ready = dict.fromkeys(workers, False)
    log.info("%d workers started: %s", count, ", ".join(str(p.pid) for p in workers.values()))
    peers = Peers(0, count, folder)
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for index, process in list(workers.items()):
                if process.poll() is None:
                    if peers.ready_file(index).is_file():
                        failures[index], was_ready[index] = 0, True
                    continue
                if stopping:
                    break
                if not was_ready[index]:  # a worker that had served died: not a failure to start
                    failures[index] += 1
                reap(peers, process.pid, index)
                if process.returncode == STARTUP_REFUSED and not was_ready[index]:
                    log.error("worker %d could not start (the cause is above: its backend or its port); every "
                              "worker would: stopping", index)
                    stopping, code = True, 1
                    break
                if failures[index] >= STARTUP_FAILURES:
                    log.error("worker %d exited %d times in a row before it was ready (status %s): stopping",
                              index, failures[index], process.returncode)
                    stopping, code = True, 1
                    break
                log.warning("worker %d (pid %d) exited with status %s: starting another", index, process.pid,
                            process.returncode)
                workers[index], was_ready[index] = spawn(index), False
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_s
        for process in workers.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
        log.info("all workers stopped")
    return code


def reap(peers: Peers, pid: int, index: int) -> None:
    """Forget a dead worker: its readiness mark, and its live gauges in the shared metrics (its
    counters stay: they are the server's, service/statistics.py)."""
    from prometheus_client import multiprocess

    peers.ready_file(index).unlink(missing_ok=True)
    multiprocess.mark_process_dead(pid, str(peers.folder / "metrics"))


def port_problem(host: str, port: int) -> str | None:
    """Why this process could not listen on host:port (another program holds it, the host is not an
    address of this machine), or None; checked before the minutes provisioning may take. Without
    SO_REUSEPORT: a port that another service's workers share (SO_REUSEPORT) is taken too, or a
    second service would join the first's gRPC port and the kernel split the calls between them."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:  # socket.gaierror for a host that does not resolve
        return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def reuse_port_socket(host: str, port: int):
    """A TCP socket bound to a port that other processes may bind too (SO_REUSEPORT), not yet
    listening: uvicorn listens once the app has started (loaded, warmed up, checked), so that the
    kernel hands a worker still loading no connection (it counts only listening sockets)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
