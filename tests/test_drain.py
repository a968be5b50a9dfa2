"""SIGTERM drains: ``fasterrcnn serve`` lets the requests in flight finish, then its process tree is gone.

A real tritonserver on the session's small export, one instance of every step, batches of one:
requests sent together queue behind each other, and SIGTERM arrives while most are still waiting.
Their total work takes longer than tritonserver's old fixed 5 s exit timeout, so every answer
after that point shows the drain at work.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from skimage import data

from exporters.repository import RepositoryOptions, write_repository
from fasterrcnn import drain as drain_module
from fasterrcnn.drain import ENSEMBLES
from fasterrcnn.server import free_port, wait_ready
from python_backend import names

from test_docker_drain import UNLOAD_TAKES_S, _FakeRepositoryApi
from test_serve_lifecycle import _descendants, _survivors

ROOT = Path(__file__).resolve().parent.parent
OLD_EXIT_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def serial_repo(small_export, tmp_path_factory):
    settings, paths = small_export
    out = tmp_path_factory.mktemp("drain_repo")
    write_repository(out, settings, paths, RepositoryOptions(max_batch_size=1, instances=1, postprocess_instances=1),
                     link=True)
    return out


def _request(client: grpcclient.InferenceServerClient, image: np.ndarray):
    inp = grpcclient.InferInput(names.IMAGE_RAW, [1, *image.shape], "UINT8")
    inp.set_data_from_numpy(image[None])
    return client.infer(names.ENSEMBLE_RAW, [inp], client_timeout=300)


@pytest.mark.triton
def test_requests_in_flight_at_sigterm_are_answered(serial_repo):
    grpc_port = free_port()
    cmd = [sys.executable, "-m", "fasterrcnn", "serve", "--repository", str(serial_repo), "--grpc-port", str(grpc_port),
           "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--drain-timeout", "120"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    url = f"127.0.0.1:{grpc_port}"
    try:
        assert wait_ready(url, lambda: proc.poll() is not None, 300), "serve did not get ready"
        image = data.astronaut()
        client = grpcclient.InferenceServerClient(url)
        _request(client, image)  # the first request warms the steps up: it says little of the next ones
        times = []
        for _ in range(2):
            t0 = time.monotonic()
            _request(client, image)
            times.append(time.monotonic() - t0)
        one = min(times)
        # enough requests that, run one after another, they outlast the old exit timeout twice over
        count = max(4, int(2 * OLD_EXIT_TIMEOUT_S / one) + 2)
        results: list = [None] * count

        def send(i):
            try:
                results[i] = _request(grpcclient.InferenceServerClient(url), image)
            except Exception as e:  # noqa: BLE001 - the test reports what each request got
                results[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        time.sleep(min(one, 1.0))  # the first is running, the rest are queued
        children = _descendants(proc.pid)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        drained = time.monotonic() - t_signal
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    failed = [r for r in results if not isinstance(r, grpcclient.InferResult)]
    assert not failed, (f"{len(failed)} of {count} requests in flight at SIGTERM failed: {[str(f) for f in failed[:3]]}"
                        f"\nserve's log:\n{err[-3000:]}")
    for r in results:
        assert r.as_numpy(names.NUM_DETECTIONS).shape == (1, 1)
    assert drained > OLD_EXIT_TIMEOUT_S, (f"the {count} requests were answered {drained:.1f} s after SIGTERM, "
                                          f"too fast to show a drain beyond {OLD_EXIT_TIMEOUT_S} s (one took {one:.2f} s)")
    assert proc.returncode == 0, err[-3000:]
    assert not _survivors(children), "processes of the server still running after serve exited"


# --- the drain's client against a stand-in of Triton's repository API ---------------------------

class _SlowIndexApi(_FakeRepositoryApi):
    """The stand-in whose first index calls after the unload answer later than the drain's timeout
    for one call (a server busy with the requests in flight)."""
    slow_answers = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        if self.path == "/v2/repository/index" and self.unloads and _SlowIndexApi.slow_answers > 0:
            _SlowIndexApi.slow_answers -= 1
            time.sleep(drain_module.INDEX_TIMEOUT_S * 3)
        super().do_POST()


@pytest.fixture
def fake_api():
    servers = []

    def start(handler):
        handler.unloads = {}
        api = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        api.daemon_threads = True
        threading.Thread(target=api.serve_forever, daemon=True).start()
        servers.append(api)
        return api, f"http://127.0.0.1:{api.server_address[1]}"

    yield start
    for api in servers:
        api.shutdown()


def test_drain_waits_for_the_unloads_past_a_slow_index(fake_api, monkeypatch):
    """An index call that times out is asked again until the deadline, not taken for a server gone."""
    monkeypatch.setattr(drain_module, "INDEX_TIMEOUT_S", 0.3)
    _SlowIndexApi.slow_answers = 2
    _, url = fake_api(_SlowIndexApi)
    t0 = time.monotonic()
    assert drain_module.drain(url, timeout=30, poll_s=0.05)
    assert sorted(_SlowIndexApi.unloads) == sorted(ENSEMBLES)
    assert time.monotonic() - t0 >= UNLOAD_TAKES_S


def test_drain_ignores_proxy_settings(fake_api):
    """The server is dialled directly: a proxy named in the environment (none listens there) is not
    used.  In a new process, as the Docker entrypoint runs it: urllib reads the environment once."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(http_proxy=dead, HTTP_PROXY=dead, all_proxy=dead, ALL_PROXY=dead)
    _, url = fake_api(_FakeRepositoryApi)
    result = subprocess.run([sys.executable, "-m", "fasterrcnn.drain", url, "30"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_FakeRepositoryApi.unloads) == sorted(ENSEMBLES)


def test_drain_where_nothing_listens_returns_at_once():
    """A server not listening yet (or any more) holds no request: nothing to wait for."""
    t0 = time.monotonic()
    assert drain_module.drain(f"http://127.0.0.1:{free_port()}", timeout=30)
    assert time.monotonic() - t0 < 5


FAKE_TRITONSERVER = """#!/bin/sh
trap 'date +%s.%N > "$1"; exit 0' TERM
while :; do sleep 0.1; done
"""


def test_stop_drains_a_server_that_start_has_not_seen_ready(fake_api, tmp_path):
    """A client can see the server ready, and send requests, before ``start`` does (it polls);
    a stop signal then must still drain it before SIGTERM reaches tritonserver."""
    from fasterrcnn.server import TritonServer

    api, _ = fake_api(_FakeRepositoryApi)
    script = tmp_path / "tritonserver"
    script.write_text(FAKE_TRITONSERVER)
    term = tmp_path / "term"
    server = TritonServer(tmp_path, http_port=api.server_address[1], host="127.0.0.1", drain_timeout_s=30)
    server.process = subprocess.Popen(["sh", str(script), str(term)], start_new_session=True)
    time.sleep(0.3)  # the stand-in's trap is set
    server.stop()
    assert sorted(_FakeRepositoryApi.unloads) == sorted(ENSEMBLES)
    stopped = float(term.read_text())
    assert stopped - max(_FakeRepositoryApi.unloads.values()) >= UNLOAD_TAKES_S, \
        "tritonserver got SIGTERM before the ensembles were unloaded"
