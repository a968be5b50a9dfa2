"""The entrypoint and ``fasterrcnn prepare`` on the volumes deploy/ asks for, without a cluster.

* Locks on an NFS-backed ReadWriteMany volume: ``tests/nfs_locks.py`` gives ``fcntl.flock`` the
  Linux NFS client's rules (an exclusive lock needs a descriptor open for writing, a shared one a
  descriptor open for reading, a conflict is EACCES or EAGAIN). The lease probe and a whole
  serve / rebuild / garbage-collect cycle through the real entrypoint run under those rules.
* A cache the container's uid cannot write (a CSI driver that ignores ``fsGroup``): the
  entrypoint stops with a message that names the folder's owner and mode and the fix.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import nfs_locks
from fasterrcnn import prepare
from test_docker import ENTRYPOINT, ROOT, _entrypoint_env, fake_nvidia_smi

CONFLICTS = {"EACCES": errno.EACCES, "EAGAIN": errno.EAGAIN}


@pytest.mark.parametrize("conflict", sorted(CONFLICTS))
def test_lease_probe_on_nfs(tmp_path, monkeypatch, conflict):
    """The probe opens the lease so that it may take an exclusive lock, and reads NFS' EACCES or
    EAGAIN as "a live server holds it"."""
    monkeypatch.setattr(fcntl, "flock", functools.partial(nfs_locks.nfs_flock, conflict=CONFLICTS[conflict]))
    lease = tmp_path / "host.abc123"
    lease.write_text("/cache/repos/key/generation\n")
    assert not prepare._locked_by_someone(lease)
    assert not prepare._locked_by_someone(tmp_path / "gone")
    server = os.open(lease, os.O_RDWR)  # as the entrypoint opens it: exec 9<>"$LEASE"
    try:
        fcntl.flock(server, fcntl.LOCK_SH)  # _take_lease's lock
        assert prepare._locked_by_someone(lease)
    finally:
        os.close(server)
    assert not prepare._locked_by_someone(lease)


def test_nfs_emulation_refuses_what_nfs_refuses(tmp_path):
    """The stand-in is strict where NFS is: a write-only descriptor cannot take a shared lock, a
    read-only one cannot take an exclusive lock."""
    path = tmp_path / "f"
    path.write_text("")
    for flags, operation in ((os.O_WRONLY, fcntl.LOCK_SH), (os.O_RDONLY, fcntl.LOCK_EX | fcntl.LOCK_NB)):
        fd = os.open(path, flags)
        try:
            with pytest.raises(OSError, match="NFS: this lock needs") as caught:
                nfs_locks.nfs_flock(fd, operation)
            assert caught.value.errno == errno.EBADF
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        nfs_locks.nfs_flock(fd, fcntl.LOCK_SH)
        nfs_locks.nfs_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# The image's exporter Python with NFS' locks, running "$EXPORT_PYTHON" -m fasterrcnn prepare ...
NFS_PREPARE = """
import runpy, sys
import nfs_locks
nfs_locks.install()
import fasterrcnn.prepare as prepare
from python_backend import names

def fake_export(detector, settings, model, repo, out, **kw):
    for name in (names.ENSEMBLE, *names.STEPS):
        (out / name).mkdir(parents=True)
        (out / name / "config.pbtxt").write_text("")

prepare.export_loaded = fake_export
# no detector and one key for the whole test (the real key covers the package's sources, which
# may change meanwhile): what runs is the locking, leasing and garbage collection
prepare.load_model = lambda options: (None, None)
prepare.engine_cache_key = lambda *args, **kwargs: "Test-GPU__nfs"
assert sys.argv[1:3] == ["-m", "fasterrcnn"], sys.argv
sys.argv = ["fasterrcnn", *sys.argv[3:]]
runpy.run_module("fasterrcnn", run_name="__main__")
"""

# A tritonserver that records its arguments and then serves (holds the lease) until killed.
HOLDING_SERVER = '#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE.tmp" && mv "$ARGS_FILE.tmp" "$ARGS_FILE"\nexec sleep 600\n'


def _nfs_env(tmp_path: Path, cache: Path, **extra) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, 1)
    (bin_dir / "tritonserver").write_text(HOLDING_SERVER)
    (bin_dir / "tritonserver").chmod(0o755)
    driver = tmp_path / "nfs_prepare.py"
    driver.write_text(NFS_PREPARE)
    python = tmp_path / "export-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{driver}" "$@"\n')
    python.chmod(0o755)
    env = _entrypoint_env(cache, EXPORT_PYTHON=str(python), ARGS_FILE=str(tmp_path / "args"),
                          PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra)
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT / "tests"), env["PYTHONPATH"]))
    return env


def _prepared(env) -> Path:
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1]).parent


def test_entrypoint_leases_hold_on_nfs(tmp_path):
    """Under NFS' lock rules: a server starts (its lease locked through the entrypoint's descriptor),
    a rebuild beside it keeps its generation, and once it stops the next rebuild removes it."""
    cache = tmp_path / "cache"
    # a process group of its own, as a container's processes are: the container's end kills them all
    server = subprocess.Popen([str(ENTRYPOINT)], env=_nfs_env(tmp_path, cache, PREPARE_ONLY="0"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "args").exists():
            if server.poll() is not None:
                pytest.fail(f"the server's entrypoint exited {server.returncode}: {server.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the server's entrypoint never reached tritonserver"
            time.sleep(0.2)
        served = Path((tmp_path / "args").read_text().splitlines()[0].removeprefix("--model-repository=")).parent
        rebuilt = _prepared(_nfs_env(tmp_path, cache, REBUILD="1"))
        assert rebuilt != served and (served.parent / "current").resolve() == rebuilt
        assert (served / "complete.json").is_file(), "a rebuild deleted the generation a server uses"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the entrypoint and tritonserver, its child
        server.communicate(timeout=30)
    newest = _prepared(_nfs_env(tmp_path, cache, REBUILD="1"))
    assert sorted(p.name for p in served.parent.iterdir() if p.is_dir() and not p.is_symlink()) == [newest.name]


# --- a cache the container's uid cannot write ----------------------------------------------------

UID = 10001  # the image's (Dockerfile USER)


@pytest.fixture
def foreign_cache():
    """A cache folder owned by another user than the one the entrypoint runs as, mode 0755, in a
    folder that uid can traverse (pytest's own tmp folders are 0700)."""
    if os.geteuid() != 0 and os.access("/", os.W_OK):
        pytest.skip("needs root (to run the entrypoint as uid 10001) or a read-only folder")
    top = Path(tempfile.mkdtemp(prefix="fasterrcnn-cache-"))
    top.chmod(0o755)
    cache = top / "cache"
    cache.mkdir(mode=0o755)
    try:
        yield cache
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _as_uid(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run the entrypoint as uid 10001")
    return [setpriv, f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *command]


@pytest.mark.parametrize("leases", ["missing", "writable"])
def test_entrypoint_explains_an_unwritable_cache(foreign_cache, leases):
    """The cache's top folder is not the container's (a CSI driver ignored fsGroup): even where a
    writable leases/ exists, the entrypoint stops before preparing, naming owner, mode and fix."""
    if leases == "writable":
        (foreign_cache / "leases").mkdir(mode=0o777)
        (foreign_cache / "leases").chmod(0o777)
    env = _entrypoint_env(foreign_cache, EXPORT_PYTHON=sys.executable)
    uid = UID if os.geteuid() == 0 else os.geteuid()
    result = subprocess.run(_as_uid([str(ENTRYPOINT)]), env=env, capture_output=True, text=True, timeout=60,
                            cwd="/")
    assert result.returncode == 1, result.stderr
    owner = os.stat(foreign_cache)
    assert f"entrypoint: cache dir {foreign_cache} is not writable by uid {uid}" in result.stderr
    assert f"owner {owner.st_uid}:{owner.st_gid}, mode 755" in result.stderr
    assert "cache-owner" in result.stderr and "docs/deploy.md" in result.stderr
    assert "prepare:" not in result.stderr, "the entrypoint should stop before preparing"
