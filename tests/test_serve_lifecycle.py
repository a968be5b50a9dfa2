"""``fasterrcnn serve`` stops cleanly: SIGTERM or SIGINT stops tritonserver, its model processes
and the MPS daemon, and the command exits 0.

The real-server tests start ``python -m fasterrcnn serve`` as a user would, on a small prepared
repository, with the nvidia-pytriton wheel's tritonserver.  MPS needs a GPU, so its part is
checked with a stand-in daemon on the same signal path.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exporters import provenance
from exporters.repository import RepositoryOptions, write_repository
from fasterrcnn.options import Options
from fasterrcnn.server import free_port, wait_ready
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent


def _stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, pgid, state, start time) of a process, None if it is gone (fields of proc(5) stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def _processes() -> dict[int, tuple[int, int, str, int]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info:
                out[int(entry.name)] = info
    return out


def _descendants(root: int) -> dict[int, tuple[int, int, str, int]]:
    """Every live process under ``root``: its children, theirs, and members of their process groups."""
    procs = _processes()
    found = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, pgid, _, _) in procs.items():
            if pid not in found and (ppid in found or (pgid in found and pgid != procs[root][1])):
                found.add(pid)
                changed = True
    found.discard(root)
    return {pid: procs[pid] for pid in found}


def _alive(pid: int, start: int) -> bool:
    info = _stat(pid)
    return info is not None and info[3] == start and info[2] != "Z"


def _survivors(procs: dict[int, tuple[int, int, str, int]], grace: float = 5.0) -> list[int]:
    """Those of ``procs`` still running after ``grace`` s (a SIGKILLed process takes a moment to go)."""
    deadline = time.monotonic() + grace
    while True:
        left = [pid for pid, (_, _, _, start) in procs.items() if _alive(pid, start)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory):
    settings, paths = small_export
    out = tmp_path_factory.mktemp("lifecycle_repo")
    write_repository(out, settings, paths, RepositoryOptions(max_batch_size=2), link=True)
    return out


def _wait_ready(proc: subprocess.Popen, grpc_port: int, timeout: float = 300.0) -> None:
    ready = wait_ready(f"127.0.0.1:{grpc_port}", lambda: proc.poll() is not None, timeout)
    if not ready:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"serve exited with {proc.returncode} before the server was ready:\n{err[-3000:]}"
                    if ready is False else "the server was not ready in time")


@pytest.mark.triton
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_and_its_processes(repo, signum):
    grpc_port = free_port()
    cmd = [sys.executable, "-m", "fasterrcnn", "serve", "--repository", str(repo), "--grpc-port", str(grpc_port),
           "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, grpc_port)
        children = _descendants(proc.pid)
        servers = [pid for pid, (ppid, *_rest) in children.items() if ppid == proc.pid]
        assert len(servers) == 1, f"expected one tritonserver child, found {children}"
        # the python-backend stubs: one process per model instance, in the server's process group
        stubs = [pid for pid, (_, pgid, _, _) in children.items() if pgid == servers[0] and pid != servers[0]]
        assert stubs, f"no model processes found under tritonserver {servers[0]}: {children}"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert f"{signal.Signals(signum).name}: stopping tritonserver" in err
    left = _survivors(children)
    assert not left, f"processes of the server still running after serve exited: {left}"


# --- the MPS daemon on the signal path (a stand-in: MPS needs a GPU) ---------------------------

class FakeMps:
    stopped = 0

    def stop(self):
        FakeMps.stopped += 1


def _repository_stub(folder: Path) -> Path:
    """Model folders with empty configs, and the manifest of a repository the Python API wrote."""
    for name in (names.ENSEMBLE, *names.STEPS):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.pbtxt").write_text("")
    provenance.write(folder, {"format": provenance.FORMAT, "package": provenance.package_record(), "weights": None,
                              "settings": {}, "repository": {}, "options": None})
    return folder


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_mps_daemon(tmp_path, monkeypatch, signum):
    """serve's handler stops the server's process group and calls MpsDaemon.stop, then returns 0."""
    import fasterrcnn.serve as serve_mod
    from fasterrcnn.server import TritonServer

    class FakeServer(TritonServer):
        def start(self, timeout: float = 300.0):
            self._mps = FakeMps()
            # a stand-in server with a child of its own, in a process group of its own like tritonserver
            self.process = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
            # the signal comes once serve waits on the server (its handlers are in place by now)
            threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()
            return self

    server = FakeServer(tmp_path, mps=True)
    monkeypatch.setattr(serve_mod, "make_server", lambda options: server)
    FakeMps.stopped = 0
    before = signal.getsignal(signum)
    assert serve_mod.serve(Options(repository=_repository_stub(tmp_path / "repo"), mps=True)) == 0
    assert FakeMps.stopped == 1 and server._mps is None
    assert server.process.returncode is not None  # reaped
    group = _survivors({pid: info for pid, info in _processes().items() if info[1] == server.process.pid})
    assert not group, f"the stand-in server's group survived: {group}"
    assert signal.getsignal(signum) is before  # the command's handlers are gone again


def test_a_server_that_dies_is_a_failure(tmp_path, monkeypatch):
    import fasterrcnn.serve as serve_mod
    from fasterrcnn.server import TritonServer

    class DyingServer(TritonServer):
        def start(self, timeout: float = 300.0):
            self.process = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
            return self

    monkeypatch.setattr(serve_mod, "make_server", lambda options: DyingServer(tmp_path))
    assert serve_mod.serve(Options(repository=_repository_stub(tmp_path / "repo"))) == 1
