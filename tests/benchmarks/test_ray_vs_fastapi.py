"""benchmarks/ray_vs_fastapi.py: Ray Serve is stopped even when its shutdown hangs."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.ray_vs_fastapi import stop_ray


def test_a_serve_run_that_ignores_sigint_is_killed_with_one_line(tmp_path, capsys):
    """A stand-in process that ignores SIGINT, as `serve run` once did; the cleanup command (Ray's
    `ray stop --force` by default, which would stop other tests' Ray) writes a marker instead."""
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stubborn.stdout.readline().strip() == "ready"
    marker = tmp_path / "cleaned"
    stop_ray(stubborn, grace_s=0.5, cleanup=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert stubborn.returncode == -9 and marker.exists()
    assert capsys.readouterr().err == "Ray Serve did not stop 0.5 s after SIGINT: killed\n"


def test_a_serve_run_that_stops_is_left_to_stop(tmp_path, capsys):
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    marker = tmp_path / "cleaned"
    stop_ray(quick, grace_s=10, cleanup=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert quick.returncode != -9 and not marker.exists() and capsys.readouterr().err == ""
