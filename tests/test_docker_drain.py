"""``docker stop`` on a serving container: the entrypoint drains tritonserver, then stops it.

The real entrypoint runs after a real preparation (the python target, a tiny random model), with a
stand-in ``tritonserver`` on PATH that records its arguments and when SIGTERM reaches it, and a
stand-in of Triton's HTTP model-repository API (index and unload) on the port the container's
arguments name.  SIGTERM to the entrypoint must unload both ensembles, wait until the API says they
are gone, and only then pass SIGTERM to tritonserver; the container exits with tritonserver's code.
The drain itself runs against a real tritonserver in ``tests/test_drain.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fasterrcnn.drain import ENSEMBLES
from test_docker import ENTRYPOINT, ROOT, _entrypoint_env, fake_nvidia_smi

UNLOAD_TAKES_S = 1.0  # the stand-in's ensembles finish their requests this long after the unload call

# records its arguments, then serves until SIGTERM, which it records with the time
FAKE_TRITONSERVER = """#!/bin/sh
printf "%s\\n" "$@" > "$ARGS_FILE"
trap 'date +%s.%N > "$TERM_FILE"; exit 0' TERM
while :; do sleep 0.1; done
"""


class _FakeRepositoryApi(BaseHTTPRequestHandler):
    unloads: dict[str, float] = {}

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v2/repository/index":
            now = time.time()
            body = [{"name": m, "version": "1",
                     "state": "UNAVAILABLE" if m in self.unloads and now - self.unloads[m] > UNLOAD_TAKES_S
                     else "UNLOADING" if m in self.unloads else "READY"} for m in ENSEMBLES]
        elif self.path.endswith("/unload"):
            self.unloads.setdefault(self.path.split("/")[-2], time.time())
            body = None
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache volume: the first test prepares the tiny model's repository, the others reuse it."""
    return tmp_path_factory.mktemp("drain") / "cache"


def test_sigterm_drains_the_ensembles_before_tritonserver_stops(tmp_path, cache):
    api = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRepositoryApi)
    _FakeRepositoryApi.unloads = {}
    threading.Thread(target=api.serve_forever, daemon=True).start()
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, 1)
    (bin_dir / "tritonserver").write_text(FAKE_TRITONSERVER)
    (bin_dir / "tritonserver").chmod(0o755)
    args_file, term_file = tmp_path / "args", tmp_path / "term"
    env = _entrypoint_env(cache, PREPARE_ONLY="0", ARGS_FILE=str(args_file), TERM_FILE=str(term_file),
                          PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SERVING_PYTHON=sys.executable,
                          DRAIN_TIMEOUT="30")
    port = api.server_address[1]
    proc = subprocess.Popen([str(ENTRYPOINT), "--log-verbose=1", f"--http-port={port}"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not args_file.exists():  # the preparation runs first (a real export of the tiny model)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "tritonserver never started"
            time.sleep(0.2)
        time.sleep(0.5)
        args = args_file.read_text().splitlines()
        assert "--model-control-mode=explicit" in args and "--load-model=*" in args
        assert "--exit-timeout-secs=30" in args and args[-1] == f"--http-port={port}"  # the container's come last
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        api.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert sorted(_FakeRepositoryApi.unloads) == sorted(ENSEMBLES), err[-3000:]
    stopped = float(term_file.read_text())
    assert all(sent <= t < stopped for t in _FakeRepositoryApi.unloads.values())
    assert stopped - min(_FakeRepositoryApi.unloads.values()) >= UNLOAD_TAKES_S, \
        "tritonserver got SIGTERM before the ensembles were unloaded"
    assert "draining tritonserver" in err


@pytest.mark.parametrize("status", [0, 3])
def test_the_container_exits_with_tritonservers_code(tmp_path, cache, status):
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, 1)
    (bin_dir / "tritonserver").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "tritonserver").chmod(0o755)
    env = _entrypoint_env(cache, PREPARE_ONLY="0", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([str(ENTRYPOINT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == status, result.stderr[-3000:]
