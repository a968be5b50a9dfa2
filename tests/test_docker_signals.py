"""``docker stop`` / a pod's termination during the first start's engine build.

The entrypoint is the container's PID 1 while ``fasterrcnn prepare`` builds (minutes), and the
kernel delivers to a PID 1 only the signals it has a handler for (pid_namespaces(7), "Signals
and the init process"). The real entrypoint runs here with a stand-in ``EXPORT_PYTHON`` that
records the signal it gets, both as an ordinary process and as PID 1 of its own PID namespace
(``unshare --pid --fork``, where available): SIGTERM or SIGINT during the build must reach the
preparation and end the entrypoint within seconds, not after the build or the grace period.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_docker import ENTRYPOINT, ROOT, _entrypoint_env

# "$EXPORT_PYTHON" -m fasterrcnn prepare ...: a build that takes a minute unless a signal ends it.
SLOW_PREPARE = f"""#!{sys.executable}
import os, signal, sys, time
from pathlib import Path

def stop(number, frame):
    Path(os.environ["SIGNAL_FILE"]).write_text(signal.Signals(number).name)
    sys.exit(128 + number)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
Path(os.environ["READY_FILE"]).write_text(str(os.getpid()))
time.sleep(60)
print("/never/model_repository")
"""


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _child_pid(pid: int) -> int:
    """The one child of ``pid`` (unshare's: the entrypoint, PID 1 inside the namespace)."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the entrypoint exited {proc.returncode} before the build started: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the stand-in build never started"
        time.sleep(0.05)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("as_pid1", [False, True], ids=["process", "pid1"])
def test_signal_during_the_build_stops_the_preparation(tmp_path, as_pid1, sent):
    if as_pid1 and not _unshare_works():
        pytest.skip("unshare --pid --fork is not permitted here (needs root or user namespaces)")
    prepare = tmp_path / "export-python"
    prepare.write_text(SLOW_PREPARE)
    prepare.chmod(0o755)
    ready, received = tmp_path / "ready", tmp_path / "signal"
    env = _entrypoint_env(tmp_path / "cache", EXPORT_PYTHON=str(prepare), READY_FILE=str(ready),
                          SIGNAL_FILE=str(received), PREPARE_ONLY="0")
    command = ["unshare", "--pid", "--fork", "--kill-child", str(ENTRYPOINT)] if as_pid1 else [str(ENTRYPOINT)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready, proc)
        entrypoint = _child_pid(proc.pid) if as_pid1 else proc.pid
        started = time.monotonic()
        os.kill(entrypoint, sent)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the entrypoint ignored {sent.name} during the build (still running after 10 s)")
        took = time.monotonic() - started
        # Python started as a background job of a non-interactive shell ignores SIGINT, so the
        # entrypoint passes both on as SIGTERM
        assert received.exists(), f"{sent.name} never reached the preparation"
        assert received.read_text() == "SIGTERM"
        assert proc.returncode == 128 + sent, proc.stderr.read()
        assert took < 5, f"the entrypoint took {took:.1f} s to stop"
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            os.kill(int(ready.read_text()), signal.SIGKILL)  # the stand-in, if it outlived the test
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
