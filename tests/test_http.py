"""The README's HTTP example against a real tritonserver: its curl command, as written, answers
what the gRPC client gets, and ``fasterrcnn_raw`` takes pixels the way the README says.  The same
server, started as a user starts it (``fasterrcnn serve --log-dir``), shows where its log goes."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from exporters.repository import RepositoryOptions, write_repository
from fasterrcnn.server import free_port
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)


def readme_curl_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Over HTTP, without the client"):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def repo(small_export, tmp_path_factory):
    settings, paths = small_export
    out = tmp_path_factory.mktemp("http_repo")
    write_repository(out, settings, paths, RepositoryOptions(max_batch_size=2), link=True)
    return out


def _photo(path: Path) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (90, 140, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 60, 150, 200), fill=(220, 40, 30))
    draw.ellipse((180, 30, 290, 140), fill=(30, 200, 60))
    img.save(path, quality=92)
    with Image.open(path) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _binary_infer(url: str, model: str, name: str, shape: list[int], payload: bytes) -> dict:
    """Triton's binary-data extension, as the README's curl sends it."""
    header = json.dumps({"inputs": [{"name": name, "datatype": "UINT8", "shape": shape,
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=header + payload,
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _outputs(answer: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


@pytest.mark.triton
def test_readme_http_example_and_the_kept_log(repo, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    import tritonclient.grpc as grpcclient

    grpc_port, http_port, logs = free_port(), free_port(), tmp_path / "server logs"
    cmd = [sys.executable, "-m", "fasterrcnn", "serve", "--repository", str(repo), "--host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(free_port()),
           "--log-dir", str(logs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        # ready once serve says so (tritonserver answering gRPC comes a moment before serve's line)
        deadline = time.monotonic() + 300
        while not any("server ready:" in ln for ln in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                reader.join(10)
                pytest.fail("serve was not ready:\n" + "".join(lines)[-3000:])
            time.sleep(0.2)
        photo = tmp_path / "photo.jpg"
        pixels = _photo(photo)
        script = readme_curl_block().replace("IMG=photo.jpg", f"IMG='{photo}'")
        script = script.replace("localhost:8000", f"127.0.0.1:{http_port}")
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.startswith("{"), run.stdout[:2000] + run.stderr[-2000:]
        answer = json.loads(run.stdout)
        assert answer["model_name"] == names.ENSEMBLE
        http = _outputs(answer)
        assert set(http) == set(OUTPUTS)
        assert http[names.DETECTION_BOXES].shape == (1, 100, 4) and http[names.NUM_DETECTIONS].shape == (1, 1)

        # the gRPC client's answer for the same bytes
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        data = np.frombuffer(photo.read_bytes(), np.uint8)[None]
        inp = grpcclient.InferInput(names.IMAGE_BYTES, list(data.shape), "UINT8")
        inp.set_data_from_numpy(data)
        result = client.infer(names.ENSEMBLE, [inp])
        for name in OUTPUTS:
            np.testing.assert_allclose(http[name], result.as_numpy(name), rtol=0, atol=1e-5, err_msg=name)

        # fasterrcnn_raw "the same way": image_raw, shape [1, H, W, 3], the RGB bytes
        raw = _outputs(_binary_infer(f"127.0.0.1:{http_port}", names.ENSEMBLE_RAW, names.IMAGE_RAW,
                                     [1, *pixels.shape], pixels.tobytes()))
        np.testing.assert_allclose(raw[names.DETECTION_BOXES], http[names.DETECTION_BOXES], rtol=0, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    (ready_line,) = [ln for ln in err.splitlines() if "server ready:" in ln]
    log_path = Path(re.search(r"; log: (.+?); stop it", ready_line).group(1))
    assert log_path.parent == logs, ready_line
    assert f"tritonserver stopped; its log: {log_path}" in err
    assert log_path.is_file() and "Started GRPCInferenceService" in log_path.read_text(errors="replace")
