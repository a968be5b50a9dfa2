"""Where tritonserver's log goes: a file per start under ``--log-dir`` (default ``logs/`` beside the
repository), kept after the server stops, named in ``serve``'s ready line and when it stops."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from fasterrcnn.__main__ import build_parser
from fasterrcnn.options import Options
from fasterrcnn.serve import make_server
from fasterrcnn.server import ServerError, TritonServer

LOG_NAME = re.compile(r"tritonserver-\d{8}-\d{6}-\w+\.log")


def _open(server: TritonServer) -> Path:
    fd, path = server._open_log()
    os.close(fd)
    return path


def test_log_goes_beside_the_repository_by_default(tmp_path):
    path = _open(TritonServer(tmp_path / "model_repository"))
    assert path.parent == tmp_path / "logs" and path.is_file()
    assert LOG_NAME.fullmatch(path.name), path.name


def test_each_start_gets_its_own_file(tmp_path):
    server = TritonServer(tmp_path / "repo")
    assert _open(server) != _open(server)


def test_log_dir_option_reaches_the_launcher(tmp_path):
    options = Options.from_args(build_parser().parse_args(["serve", "--log-dir", str(tmp_path / "my logs")]))
    server = make_server(options)
    assert server.logs_folder() == tmp_path / "my logs"
    path = _open(server)
    assert path.parent == tmp_path / "my logs"


def test_log_dir_defaults_to_none():
    assert Options().log_dir is None
    assert make_server(Options()).logs_folder().name == "logs"


def test_an_unwritable_log_dir_names_the_option(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(ServerError, match=r"cannot write tritonserver's log in .*a file.*--log-dir"):
        _open(TritonServer(tmp_path / "repo", log_dir=blocker))


def test_serve_names_the_log_when_ready_and_when_stopped(monkeypatch, caplog, tmp_path):
    import fasterrcnn.serve as serve_mod

    def start(self, timeout=300.0):
        fd, self.log_path = self._open_log()
        os.write(fd, b"tritonserver's own output\n")
        os.close(fd)
        return self

    monkeypatch.setattr(serve_mod, "ensure_repository", lambda options, **kw: options)
    monkeypatch.setattr(serve_mod.repository_check, "weights_warning", lambda path: None)
    monkeypatch.setattr(TritonServer, "start", start)
    monkeypatch.setattr(TritonServer, "wait", lambda self: 0)
    monkeypatch.setattr(TritonServer, "stop", lambda self, timeout=None: None)
    caplog.set_level(logging.INFO, logger="fasterrcnn.serve")
    options = Options(repository=tmp_path / "repo", log_dir=tmp_path / "logs")
    assert serve_mod.serve(options) == 0
    messages = [r.getMessage() for r in caplog.records]
    (ready,) = [m for m in messages if m.startswith("server ready:")]
    path = Path(re.search(r"; log: (\S+);", ready).group(1))
    assert path.parent == tmp_path / "logs" and LOG_NAME.fullmatch(path.name)
    assert f"tritonserver stopped; its log: {path}" in messages
    assert path.read_text() == "tritonserver's own output\n"  # kept after the stop
