"""Usage errors name the flag (or the Docker variable) and come with the subcommand's usage;
``serve --host`` binds tritonserver's endpoints and the ready line says where it listens."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fasterrcnn.__main__ import build_parser, main
from fasterrcnn.options import Options, OptionsError

# --- usage errors name the flag -----------------------------------------------------------------

@pytest.fixture
def nothing_runs(monkeypatch):
    """A value that passes validation fails the test at once instead of exporting or serving."""
    import importlib

    def ran(*args, **kwargs):
        raise AssertionError("the command ran: its options were accepted")

    for module, name in (("exporters.export", "export"), ("fasterrcnn.repository", "export_repository"),
                         ("fasterrcnn.serve", "serve"), ("fasterrcnn.demo", "demo")):
        try:
            monkeypatch.setattr(importlib.import_module(module), name, ran)
        except (ImportError, AttributeError):
            pass


@pytest.mark.parametrize("command, args, message", [
    ("export", ["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
    ("export", ["--max-batch-size", "65"], "--max-batch-size must be <= 64, got 65"),
    ("export", ["--instances", "0"], "--instances must be >= 1, got 0"),
    ("export", ["--rpn-instances", "-1"], "--rpn-instances must be >= 0, got -1"),
    ("export", ["--postprocess-instances", "-2"], "--postprocess-instances must be >= 0, got -2"),
    ("export", ["--num-classes", "1"], "--num-classes must be >= 2 (background included), got 1"),
    ("export", ["--min-size", "0"], "--min-size must be >= 1, got 0"),
    ("export", ["--workspace-gib", "0"], "--workspace-gib must be > 0, got 0.0"),
    ("export", ["--queue-delay-us", "-5"], "--queue-delay-us must be >= 0, got -5"),
    ("export", ["--target", "torch", "--rpn-memory-gib", "0"], "--rpn-memory-gib must be > 0, got 0.0"),
    ("export", ["--precision", "fp16"], "--precision fp16 does not apply to --target python: choose one of fp32"),
    ("serve", ["--grpc-port", "70000"], "--grpc-port must be <= 65535, got 70000"),
    ("serve", ["--http-port", "0"], "--http-port must be >= 1, got 0"),
    ("serve", ["--cuda-pool-bytes", "-1"], "--cuda-pool-bytes must be >= 0, got -1"),
    ("serve", ["--host", "every"], "argument --host: host must be an IP address"),
    ("demo", ["--max-size", "0"], "--max-size must be >= 1, got 0"),
])
def test_a_bad_value_is_named_by_its_flag_with_the_subcommands_usage(command, args, message, capsys, nothing_runs):
    with pytest.raises(SystemExit) as info:
        main([command, *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fasterrcnn {command} "), err
    assert f"fasterrcnn {command}: error: {message}" in err, err


@pytest.mark.parametrize("env, message", [
    ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE must be >= 1, got 0"),
    ({"WORKSPACE_GIB": "-1"}, "WORKSPACE_GIB must be > 0, got -1.0"),
    ({"TARGET": "python", "PRECISION": "fp16"}, "PRECISION fp16 does not apply to TARGET python"),
])
def test_a_bad_variable_is_named_by_its_variable(env, message):
    with pytest.raises(OptionsError) as info:
        Options.from_env(env)
    assert str(info.value).startswith(message)


def test_the_library_error_names_the_field():
    with pytest.raises(OptionsError) as info:
        Options(max_batch_size=0)
    assert str(info.value) == "max_batch_size must be >= 1, got 0" and info.value.fields == ("max_batch_size",)


# --- serve --host -------------------------------------------------------------------------------

BINARY = Path("/opt/tritonserver/bin/tritonserver")


def _command(host: str | None = None) -> list[str]:
    from fasterrcnn.serve import make_server
    from fasterrcnn.server import TritonBinary

    argv = ["serve", *(["--host", host] if host else [])]
    options = Options.from_args(build_parser().parse_args(argv))
    return make_server(options).command(TritonBinary(BINARY, None))


@pytest.mark.parametrize("host", [None, "127.0.0.1", "10.1.2.3", "::1"])
def test_host_binds_grpc_and_http(host):
    cmd = _command(host)
    bound = host or "0.0.0.0"
    assert [a for a in cmd if "-address=" in a] == [f"--grpc-address={bound}", f"--http-address={bound}"]


def _ready_line(monkeypatch, caplog, tmp_path, *argv) -> str:
    """The line ``serve`` logs once tritonserver is ready (the launch and the export faked)."""
    import fasterrcnn.serve as serve_mod
    from fasterrcnn.server import TritonServer

    monkeypatch.setattr(serve_mod, "ensure_repository", lambda options, **kw: options)
    if hasattr(serve_mod, "repository_check"):  # the repository's provenance: not this test's subject
        monkeypatch.setattr(serve_mod.repository_check, "weights_warning", lambda path: None)
    monkeypatch.setattr(TritonServer, "start", lambda self, timeout=300.0: self)
    monkeypatch.setattr(TritonServer, "wait", lambda self: 0)
    monkeypatch.setattr(TritonServer, "stop", lambda self, timeout=30.0: None)
    caplog.set_level(logging.INFO, logger="fasterrcnn.serve")
    options = Options.from_args(build_parser().parse_args(["serve", "--repository", str(tmp_path), *argv]))
    assert serve_mod.serve(options) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("server ready:")]
    return line


def test_ready_line_says_every_interface_by_default(monkeypatch, caplog, tmp_path):
    line = _ready_line(monkeypatch, caplog, tmp_path, "--grpc-port", "9001")
    assert line.startswith("server ready: gRPC 0.0.0.0:9001 (every interface; from this machine 127.0.0.1:9001), "
                           "HTTP 0.0.0.0:8000, metrics 0.0.0.0:8002"), line


def test_ready_line_says_the_bound_address(monkeypatch, caplog, tmp_path):
    line = _ready_line(monkeypatch, caplog, tmp_path, "--host", "127.0.0.1")
    assert line.startswith("server ready: gRPC 127.0.0.1:8001, HTTP 127.0.0.1:8000, metrics 127.0.0.1:8002;"), line


@pytest.mark.parametrize("host, url", [("0.0.0.0", "127.0.0.1:8001"), ("::", "[::1]:8001"),
                                       ("192.168.0.7", "192.168.0.7:8001"), ("::1", "[::1]:8001")])
def test_grpc_url_dials_the_bound_address(host, url):
    from fasterrcnn.server import TritonServer

    assert TritonServer(Path("."), host=host).grpc_url == url


# --- the command line starts without torch ------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["detect", "--help"], ["serve", "--help"],
                                  ["export", "--max-batch-size", "0"]], ids=" ".join)
def test_the_command_line_does_not_import_torch_to_parse(args):
    """Help, usage errors and ``detect`` (a gRPC client) don't load torch: only exporting needs it."""
    import subprocess
    import sys

    code = ("import sys\nfrom fasterrcnn.__main__ import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'torchvision' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stderr.strip().splitlines()[-1] == "False False", result.stderr[-2000:]


def test_the_coco_digest_names_torchvisions_default_weights():
    from exporters.model_options import COCO_DIGEST
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    assert COCO_DIGEST == "torchvision-" + FasterRCNN_ResNet50_FPN_Weights.DEFAULT.name
