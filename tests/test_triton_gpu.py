"""The ensemble with KIND_GPU python steps (CuPy kernels, GPU tensors between steps) in a real
tritonserver: detections equal the CPU path's and torchvision's, for images of every orientation
(each request on its own canvas of the small model's default set), sent encoded (``image``, UINT8
bytes, read through DLPack under numpy 1 and numpy 2 alike) and decoded.  Needs CUDA and CuPy."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from client import detect
from fasterrcnn.server import TritonServer, free_port
from exporters.repository import RepositoryOptions, write_repository
from evaluation.onnx_pipeline import OnnxPipeline
from evaluation.parity import assert_parity, from_packed, torchvision_detect
from evaluation.payloads import encode, textured_image
from python_backend import names

cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU path)")
try:
    _gpus = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver
    _gpus = 0
pytestmark = [pytest.mark.gpu, pytest.mark.triton,
              pytest.mark.skipif(_gpus == 0, reason="no CUDA device")]

IMAGES = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
          "portrait": textured_image(400, 240, seed=1), "tiny": textured_image(12, 20, seed=2),
          "1:16": textured_image(40, 640, seed=5), "16:1": textured_image(640, 40, seed=6)}


@pytest.fixture(scope="module")
def gpu_server(small_export, tmp_path_factory):
    settings, paths = small_export
    repo = tmp_path_factory.mktemp("gpu_repo")
    write_repository(repo, settings, paths, RepositoryOptions(device="gpu", max_batch_size=4, queue_delay_us=100_000,
                                                              jpeg_decoder="gpu"), link=True)
    srv = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       cuda_pool_bytes=1 << 30)
    srv.start(timeout=300)
    yield srv
    srv.stop()


def _dets(res):
    return from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                    names.DETECTION_LABELS, names.NUM_DETECTIONS)))


@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "raw"])
def test_gpu_ensemble_matches_cpu_path_and_torchvision(gpu_server, small_export, small_model, encoded):
    """The GPU preprocess gives torchvision's pixels on CUDA, which round otherwise than the CPU's
    (python_backend/torch_image.py), so the GPU ensemble is held to the parity criterion against both
    the CPU path and torchvision, not to the CPU path's exact numbers."""
    settings, paths = small_export
    cpu = OnnxPipeline(paths["rpn"], paths["header"], settings)
    client = detect.connect(gpu_server.grpc_url)
    order = list(IMAGES) + ["coffee", "tiny"]
    payloads = [encode(IMAGES[n]) if encoded else IMAGES[n] for n in order]
    results = detect.infer_many(client, payloads, concurrency=len(order))
    for name, res in zip(order, results):
        assert not isinstance(res, Exception), f"{res}\n--- server log ---\n{gpu_server.log_text()[-6000:]}"
        ours = _dets(res)
        (expected,) = cpu([IMAGES[name]])
        assert_parity(expected, ours, f"GPU ensemble {name} against the CPU path")
        assert_parity(torchvision_detect(small_model, IMAGES[name]), ours, f"GPU ensemble {name}")


def test_gpu_jpeg_requests_are_decoded_by_nvjpeg(gpu_server, small_model):
    """JPEG requests on GPU instances (jpeg_decoder "gpu", opt-in): detections equal
    torchvision's on the pixels torchvision's own GPU decoder gives (``decode_jpeg(device="cuda")``),
    alone and batched together; a CMYK JPEG (Pillow's) is served, and a truncated JPEG gets
    Pillow's error, without losing the requests beside it."""
    import io

    import torch
    import torchvision.io
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    client = detect.connect(gpu_server.grpc_url)
    order = ["astronaut", "coffee", "portrait", "1:16"]
    jpegs = [encode(IMAGES[n], "JPEG", quality=90) for n in order]
    results = detect.infer_many(client, jpegs, concurrency=len(jpegs))
    for name, data, res in zip(order, jpegs, results):
        assert not isinstance(res, Exception), f"{res}\n--- server log ---\n{gpu_server.log_text()[-6000:]}"
        pixels = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device="cuda",
                                            mode=torchvision.io.ImageReadMode.RGB)
        assert_parity(torchvision_detect(small_model, pixels.permute(1, 2, 0).cpu().numpy()), _dets(res),
                      f"GPU-decoded JPEG {name}")
    buf = io.BytesIO()
    Image.fromarray(IMAGES["coffee"]).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    mixed = detect.infer_many(client, [cmyk, jpegs[0][: len(jpegs[0]) // 2], jpegs[1]], concurrency=3)
    pillow = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    assert not isinstance(mixed[0], Exception), mixed[0]
    assert_parity(torchvision_detect(small_model, pillow), _dets(mixed[0]), "CMYK JPEG (Pillow)")
    assert isinstance(mixed[1], InferenceServerException) and "truncated" in mixed[1].message()
    assert not isinstance(mixed[2], Exception), mixed[2]


def test_gpu_raw_entry_point_and_bad_input(gpu_server, small_model):
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = detect.connect(gpu_server.grpc_url)
    img = IMAGES["portrait"]
    inp = g.InferInput(names.IMAGE_RAW, [1, *img.shape], "UINT8")
    inp.set_data_from_numpy(img[None])
    assert_parity(torchvision_detect(small_model, img), _dets(client.infer(names.ENSEMBLE_RAW, [inp])), "raw on GPU")
    bad = detect.infer_many(client, [b"not an image", encode(IMAGES["tiny"]), np.zeros((1, 400, 3), np.uint8)],
                            concurrency=3)
    assert isinstance(bad[0], InferenceServerException) and "not a decodable image" in bad[0].message()
    assert not isinstance(bad[1], Exception)
    assert isinstance(bad[2], InferenceServerException) and "resizes to 0x320" in bad[2].message()
    assert client.is_server_ready()


# every shape #14 names, on the default export (800/1333, its five canvases), sent as PNG so that
# torchvision sees the very pixels the server decodes
DEFAULT_SHAPES = {"landscape photo": skimage.data.coffee(), "square photo": skimage.data.astronaut(),
                  "portrait photo": np.ascontiguousarray(skimage.data.coffee().transpose(1, 0, 2)),
                  "portrait 3:4": textured_image(640, 480, seed=11), "1:16": textured_image(100, 1600, seed=12),
                  "16:1": textured_image(1600, 100, seed=13), "tiny": textured_image(20, 20, seed=14),
                  "1xN": textured_image(1, 300, seed=15),
                  "large 6000x4000": np.repeat(np.repeat(skimage.data.astronaut(), 8, 0), 12, 1)[:4000, :6000]}
# a one-pixel row (4x1333 after the resize) where the default random weights find nothing (seen on
# the CPU for several widths and seeds): served without error and, like torchvision, empty
EMPTY_SHAPES = {"1xN"}


def test_default_torch_export_on_the_gpu_serves_every_shape(tmp_path):
    """``fasterrcnn export --target torch --device gpu`` with every default (random weights, fp32,
    the auto canvases) in a real tritonserver: each image of DEFAULT_SHAPES, sent together and then
    one at a time, gets torchvision's detections on the same GPU with TF32 off."""
    import torch

    from exporters import torch_export
    from exporters.loading import random_model
    from fasterrcnn.__main__ import main as cli_main

    repo = tmp_path / "repo"
    assert cli_main(["export", "--target", "torch", "--device", "gpu", "--repository", str(repo)]) == 0
    srv = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       cuda_pool_bytes=4 << 30)
    srv.start(timeout=300)
    try:
        model = random_model(num_classes=91, seed=0).cuda().eval()
        with torch_export._tf32_off():
            want = {name: torchvision_detect(model, image) for name, image in DEFAULT_SHAPES.items()}
        client = detect.connect(srv.grpc_url)
        order = list(DEFAULT_SHAPES)
        payloads = [encode(DEFAULT_SHAPES[name]) for name in order]
        for concurrency in (len(order), 1):
            results = detect.infer_many(client, payloads, concurrency=concurrency)
            for name, res in zip(order, results):
                assert not isinstance(res, Exception), f"{name}: {res}\n--- server log ---\n{srv.log_text()[-6000:]}"
                what = f"default torch export on the GPU, {name}, concurrency {concurrency}"
                if name in EMPTY_SHAPES:
                    assert len(want[name].scores) == len(_dets(res).scores) == 0, what
                else:
                    assert_parity(want[name], _dets(res), what)
    finally:
        srv.stop()
