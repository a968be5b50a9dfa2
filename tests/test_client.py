"""The client as a user runs it: ``python -m client.detect`` (also ``fasterrcnn detect``) in a
subprocess against a real tritonserver, checking what it prints and its exit code; and
``fasterrcnn export --weights coco`` offline."""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from exporters import loading
from evaluation.parity import Detections, assert_parity, torchvision_detect
from evaluation.payloads import encode, textured_image
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
CLIENT = [sys.executable, "-m", "client.detect"]
COCO_FILE = Path(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.url).name


def cli(*args, env: dict | None = None, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLIENT, *(str(a) for a in args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kw)


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# --- --weights coco without network -----------------------------------------------------------

def _offline_env(torch_home: Path) -> dict:
    """An empty torch cache, and every HTTP(S) request sent to a closed local port: the download
    fails at once, the same way on every machine, and nothing leaves this one."""
    env = dict(os.environ, TORCH_HOME=str(torch_home), no_proxy="", NO_PROXY="")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[var] = "http://127.0.0.1:9"  # discard port: nothing listens
    return env


def test_coco_weights_offline_cli_names_the_alternatives(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fasterrcnn", "export", "--weights", "coco",
                           "--repository", str(tmp_path / "repo")], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=_offline_env(tmp_path / "torch"))
    assert proc.returncode == 2, proc.stderr
    _no_traceback(proc)
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1, proc.stderr
    assert "--weights random" in error[0] and "--weights PATH" in error[0]
    assert f"copy that file to {tmp_path / 'torch' / 'hub' / 'checkpoints' / COCO_FILE}" in error[0]
    assert not (tmp_path / "repo").exists()


def test_coco_weights_offline_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    refused = urllib.error.URLError("[Errno -2] Name or service not known")

    def offline(url, *args, **kwargs):
        raise refused

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(loading.CocoWeightsUnavailable) as info:
        loading.coco_model()
    expected = tmp_path / "hub" / "checkpoints" / COCO_FILE
    assert loading.coco_weights_path() == expected
    assert str(expected) in str(info.value) and "Name or service not known" in str(info.value)
    assert info.value.__cause__ is refused


# --- a real server ---------------------------------------------------------------------------------

def _start(repo: Path):
    from fasterrcnn.server import ServerError, TritonServer, free_port

    srv = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        srv.start(timeout=240)
    except ServerError as e:
        pytest.fail(str(e))
    return srv


@pytest.fixture(scope="module")
def server(small_export, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc")
    from exporters.repository import RepositoryOptions, write_repository

    settings, paths = small_export
    repo = tmp_path_factory.mktemp("client_repo")
    write_repository(repo, settings, paths, RepositoryOptions(max_batch_size=4), link=True)
    srv = _start(repo)
    yield srv
    srv.stop()


GOOD = {"portrait.png": textured_image(400, 240, seed=1), "tiny.png": textured_image(12, 20, seed=2),
        "astronaut.png": np.ascontiguousarray(skimage.data.astronaut()[::2, ::2])}


def _write_good(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, img in GOOD.items():
        out[name] = folder / name
        out[name].write_bytes(encode(img))
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _as_detections(record: dict) -> Detections:
    d = record["detections"]
    return Detections(np.array([x["box"] for x in d], np.float32).reshape(-1, 4),
                      np.array([x["score"] for x in d], np.float32), np.array([x["label_id"] for x in d], np.int64))


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words of its error in either mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(GOOD["portrait.png"], "JPEG")
    bad = {"text": ("notes.txt", b"not an image at all\n", "not a decodable image"),
           "truncated": ("cut.jpg", jpeg[: len(jpeg) // 3], "corrupt or truncated"),
           "empty": ("empty.png", b"", "empty file")}
    out = {}
    for case, (name, data, words) in bad.items():
        (folder / name).write_bytes(data)
        out[case] = (folder / name, words)
    # read() fails although the file exists: permissions can't show this when the tests run as root
    out["unreadable"] = (Path("/proc/self/mem"), "cannot read the file (Input/output error)")
    if os.geteuid() != 0:
        locked = folder / "locked.png"
        locked.write_bytes(encode(GOOD["tiny.png"]))
        locked.chmod(0)
        out["no permission"] = (locked, "cannot read the file (Permission denied)")
    return out


@pytest.mark.triton
@pytest.mark.parametrize("raw", [False, True], ids=["encoded", "raw"])
def test_bad_inputs_get_their_own_error_and_the_good_images_their_detections(server, small_model, tmp_path, raw):
    good = _write_good(tmp_path / "good")
    bad = _bad_inputs(tmp_path / "bad")
    args = [good["portrait.png"], *(p for p, _ in bad.values()), good["tiny.png"]]
    proc = cli(*args, "--url", server.grpc_url, "--output", tmp_path / "out.jsonl", *(["--raw"] if raw else []))
    assert proc.returncode == 1, proc.stderr
    _no_traceback(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(bad), proc.stderr
    for (path, words), line in zip(bad.values(), errors):
        assert line.startswith(f"error: {path}: ") and words in line, line
    records = _records(tmp_path / "out.jsonl")
    assert [r["image"] for r in records] == [str(a) for a in args]
    by_image = {r["image"]: r for r in records}
    for name in ("portrait.png", "tiny.png"):
        record = by_image[str(good[name])]
        assert "error" not in record, record
        assert_parity(torchvision_detect(small_model, GOOD[name]), _as_detections(record), f"{name} beside bad inputs")
    lines = proc.stdout.splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [str(good["portrait.png"]), str(good["tiny.png"])]
    summary = rf"^{len(args)} inputs: 2 answered in [\d.]+ s \([\d.]+ images/s\), {len(bad)} failed$"
    assert re.search(summary, proc.stderr, re.M), proc.stderr


@pytest.mark.triton
def test_a_directory_or_unreadable_path_given_to_run_is_an_error_record(server, tmp_path):
    from client import detect

    good = _write_good(tmp_path / "good")
    (tmp_path / "folder.png").mkdir()
    records = detect.run(server.grpc_url, [tmp_path / "folder.png", good["tiny.png"]], concurrency=2)
    assert records[0] == {"image": str(tmp_path / "folder.png"), "error": "cannot read the file (Is a directory)",
                          "detections": []}
    assert len(records[1]["detections"]) > 0 and "error" not in records[1]


@pytest.mark.triton
def test_missing_path_glob_and_empty_folder_beside_a_good_image(server, tmp_path):
    good = _write_good(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    missing, pattern = tmp_path / "missing.jpg", str(tmp_path / "nothing" / "*.jpg")
    proc = cli(good["tiny.png"], missing, pattern, tmp_path / "empty", "--url", server.grpc_url, "--json")
    assert proc.returncode == 1, proc.stderr
    _no_traceback(proc)
    records = [json.loads(ln) for ln in proc.stdout.splitlines()]
    by_image = {r["image"]: r for r in records}
    assert len(records) == 4 and len(by_image[str(good["tiny.png"])]["detections"]) > 0
    assert by_image[str(missing)]["error"] == f"no such file or directory: {missing}"
    assert by_image[pattern]["error"] == f"no files match {pattern}"
    assert by_image[str(tmp_path / "empty")]["error"].startswith(f"no images in {tmp_path / 'empty'} (looked for")
    assert f"error: no such file or directory: {missing}" in proc.stderr.splitlines()


def test_only_an_empty_folder_exits_1_without_contacting_a_server(tmp_path):
    from fasterrcnn.server import free_port

    (tmp_path / "empty").mkdir()
    # Nothing listens at --url: reaching for it would end in "cannot reach Triton" and exit 2.
    proc = cli(tmp_path / "empty", "--url", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0].startswith(f"error: no images in {tmp_path / 'empty'}")
    assert proc.stdout == ""


def test_usage_errors_and_an_unreachable_server_exit_2(tmp_path):
    from fasterrcnn.server import free_port

    image = tmp_path / "a.png"
    image.write_bytes(encode(GOOD["tiny.png"]))
    proc = cli(image, "--concurrency", "0")
    assert proc.returncode == 2 and "--concurrency: expected a whole number of at least 1, got 0" in proc.stderr
    proc = cli(image, "--output", tmp_path / "no" / "such" / "dir" / "x.jsonl")
    assert proc.returncode == 2 and f"cannot write {tmp_path / 'no' / 'such' / 'dir' / 'x.jsonl'}" in proc.stderr
    port = free_port()
    proc = cli(image, "--url", f"127.0.0.1:{port}")
    assert proc.returncode == 2 and f"error: cannot reach Triton at 127.0.0.1:{port}" in proc.stderr
    _no_traceback(proc)


@pytest.mark.triton
def test_raw_checks_and_uses_fasterrcnn_raw(small_export, tmp_path_factory, tmp_path):
    """A server with only ``fasterrcnn_raw`` (as when string inputs can't be read, see README):
    --raw works there, and without --raw the error names the missing ``fasterrcnn``."""
    pytest.importorskip("tritonclient.grpc")
    from exporters.repository import RepositoryOptions, write_repository

    settings, paths = small_export
    repo = tmp_path_factory.mktemp("raw_only_repo")
    write_repository(repo, settings, paths, RepositoryOptions(max_batch_size=2), link=True)
    shutil.rmtree(repo / names.ENSEMBLE)
    good = _write_good(tmp_path)
    srv = _start(repo)
    try:
        proc = cli(good["tiny.png"], "--url", srv.grpc_url, "--raw")
        assert proc.returncode == 0, proc.stderr
        assert re.fullmatch(rf"{re.escape(str(good['tiny.png']))}: \d+ detections, \d+ ms: .+\n", proc.stdout)
        proc = cli(good["tiny.png"], "--url", srv.grpc_url)
        assert proc.returncode == 2
        assert f"error: model {names.ENSEMBLE!r}" in proc.stderr, proc.stderr
    finally:
        srv.stop()


@pytest.mark.triton
def test_draw_writes_one_distinct_file_per_image(server, tmp_path):
    images = {tmp_path / "a" / "x.jpg": (96, 64), tmp_path / "a" / "x.png": (40, 80), tmp_path / "b" / "x.jpg": (60, 100)}
    for path, (h, w) in images.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(textured_image(h, w, seed=h), "JPEG" if path.suffix == ".jpg" else "PNG"))
    out = tmp_path / "annotated"
    proc = cli(*images, "--url", server.grpc_url, "--draw", out, "--output", tmp_path / "d.jsonl")
    assert proc.returncode == 0, proc.stderr
    written = {r["image"]: r["annotated"] for r in _records(tmp_path / "d.jsonl")}
    assert written == {str(tmp_path / "a" / "x.jpg"): str(out / "x.jpg.png"),
                       str(tmp_path / "a" / "x.png"): str(out / "x.png.png"),
                       str(tmp_path / "b" / "x.jpg"): str(out / "x.jpg.2.png")}
    from PIL import Image

    for image, annotated in written.items():
        with Image.open(annotated) as im:
            assert im.format == "PNG" and im.size == images[Path(image)][::-1]
    assert sorted(p.name for p in out.iterdir()) == ["x.jpg.2.png", "x.jpg.png", "x.png.png"]


@pytest.mark.triton
def test_summary_lines_json_and_output_file(server, tmp_path):
    good = _write_good(tmp_path / "imgs")
    proc = cli(tmp_path / "imgs", "--url", server.grpc_url, "--concurrency", "2", "--output", tmp_path / "o.jsonl")
    assert proc.returncode == 0, proc.stderr
    records = _records(tmp_path / "o.jsonl")
    assert [r["image"] for r in records] == [str(p) for p in sorted(good.values())]
    for line, record in zip(proc.stdout.splitlines(), records):
        dets = record["detections"]
        top = max(dets, key=lambda d: d["score"])
        head = f"{record['image']}: {len(dets)} detections, {record['latency_ms']:.0f} ms: {top['label']} {top['score']:.2f}"
        assert line.startswith(head), (line, head)
        assert len(line) < 200
    assert re.search(r"^3 inputs: 3 answered in [\d.]+ s \([\d.]+ images/s\), 0 failed$", proc.stderr, re.M), \
        proc.stderr
    assert "detecting" not in proc.stderr  # no progress bar when stderr is not a terminal

    proc = cli(tmp_path / "imgs", "--url", server.grpc_url, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(ln) for ln in proc.stdout.splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "latency_ms"} for r in rs]  # noqa: E731
    assert strip(printed) == strip(records)
    assert all(r["detections"] and set(r["detections"][0]) == {"label", "label_id", "score", "box"} for r in printed)


@pytest.mark.triton
def test_progress_bar_on_a_terminal(server, tmp_path):
    from client.output import PROGRESS_MIN_IMAGES

    n = PROGRESS_MIN_IMAGES + 2
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:02d}.png").write_bytes(encode(textured_image(24, 32, seed=i)))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*CLIENT, str(folder), "--url", server.grpc_url], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=slave, env=dict(os.environ, TERM="xterm"), text=True)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    text = terminal.decode(errors="replace")
    assert "detecting" in text and re.search(rf"\b\d+/{n}\b", text), text[-2000:]
    assert re.search(rf"{n} inputs: {n} answered in [\d.]+ s \([\d.]+ images/s\), 0 failed", text)
    assert len(stdout.splitlines()) == n  # piped stdout keeps its lines; none went to the terminal
    assert "detections" not in text


def test_help_shows_defaults_and_the_prog_name():
    proc = cli("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m client.detect ")
    for text in ("(default: 127.0.0.1:8001)", "(default: 1)", "(default: the output keeps every", "exit status:"):
        assert text in " ".join(proc.stdout.split())
    proc = subprocess.run([sys.executable, "-m", "fasterrcnn", "detect", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fasterrcnn detect ")

    from client.detect import build_parser

    parser = build_parser()
    rendered = " ".join(parser.format_help().split())
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in rendered, action.option_strings


class _Server:
    """The two metadata calls check_model makes, answering with a given ``image`` input."""

    def __init__(self, datatype: str, shape: list[str]):
        self.image = {"name": names.IMAGE_BYTES, "datatype": datatype, "shape": shape}

    def is_model_ready(self, model):
        return True

    def get_model_metadata(self, model, as_json=True):
        outputs = [{"name": n, "datatype": d, "shape": s} for n, d, s in (
            (names.DETECTION_BOXES, "FP32", ["-1", "100", "4"]), (names.DETECTION_SCORES, "FP32", ["-1", "100"]),
            (names.DETECTION_LABELS, "INT32", ["-1", "100"]), (names.NUM_DETECTIONS, "INT32", ["-1", "1"]))]
        return {"inputs": [self.image], "outputs": outputs}

    def get_model_config(self, model, as_json=True):
        return {"config": {"max_batch_size": 8}}


@pytest.mark.parametrize("datatype, shape, message", [
    ("BYTES", ["-1", "1"], "fasterrcnn input 'image' datatype: expected UINT8, got BYTES"),  # an older server's
    ("UINT8", ["-1", "-1", "3"], "fasterrcnn input 'image' shape: expected ['-1', '-1'], got ['-1', '-1', '3']"),
])
def test_check_model_names_what_differs(datatype, shape, message):
    """The encoded entry point's contract, from the metadata: ``image`` UINT8 [-1, -1] (one image of
    N bytes per request); an older server's TYPE_STRING input is refused before anything is sent."""
    from client.detect import ClientError, check_model

    assert check_model(_Server("UINT8", ["-1", "-1"])) == {"max_batch_size": 8}
    with pytest.raises(ClientError) as err:
        check_model(_Server(datatype, shape))
    assert str(err.value) == message


def test_an_encoded_payload_is_sent_as_its_bytes():
    pytest.importorskip("tritonclient.grpc")
    from client.detect import _request

    data = encode(GOOD["tiny.png"])
    (inp,), _ = _request(data)
    assert (inp.name(), inp.datatype(), inp.shape()) == (names.IMAGE_BYTES, "UINT8", [1, len(data)])
    assert inp._get_content() == data  # the file's bytes as they are
    (raw,), _ = _request(GOOD["tiny.png"])
    assert (raw.name(), raw.datatype(), raw.shape()) == (names.IMAGE_RAW, "UINT8", [1, 12, 20, 3])
    assert raw._get_content() == GOOD["tiny.png"].tobytes()
