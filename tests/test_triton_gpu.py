"""The ensemble with KIND_GPU python steps (CuPy kernels, GPU tensors between steps) in a real
tritonserver: detections equal the CPU path's and torchvision's.  Needs CUDA and CuPy."""
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

# Under numpy 2 (the GPU machine) this Triton build's python backend garbles string tensors
# before model code runs (python_backend/triton_io.bytes_items), so requests go to fasterrcnn_raw.
NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def payload(image):
    return image if NUMPY2 else encode(image)


IMAGES = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
          "portrait": textured_image(400, 240, seed=1), "tiny": textured_image(12, 20, seed=2)}


@pytest.fixture(scope="module")
def gpu_server(square_export, tmp_path_factory):
    settings, paths = square_export
    repo = tmp_path_factory.mktemp("gpu_repo")
    write_repository(repo, settings, paths, RepositoryOptions(device="gpu", max_batch_size=4, queue_delay_us=100_000))
    srv = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       cuda_pool_bytes=1 << 30)
    srv.start(timeout=300)
    yield srv
    srv.stop()


def _dets(res):
    return from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                    names.DETECTION_LABELS, names.NUM_DETECTIONS)))


def test_gpu_ensemble_equals_cpu_path_and_torchvision(gpu_server, square_export, small_model):
    settings, paths = square_export
    cpu = OnnxPipeline(paths["rpn"], paths["header"], settings)
    client = detect.connect(gpu_server.grpc_url)
    order = list(IMAGES) + ["coffee", "tiny"]
    results = detect.infer_many(client, [payload(IMAGES[n]) for n in order], concurrency=len(order))
    for name, res in zip(order, results):
        assert not isinstance(res, Exception), f"{res}\n--- server log ---\n{gpu_server.log_text()[-6000:]}"
        ours = _dets(res)
        (expected,) = cpu([IMAGES[name]])
        np.testing.assert_array_equal(ours.labels, expected.labels, err_msg=name)
        np.testing.assert_allclose(ours.boxes, expected.boxes, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(ours.scores, expected.scores, atol=1e-5, err_msg=name)
        assert_parity(torchvision_detect(small_model, IMAGES[name]), ours, f"GPU ensemble {name}")


def test_gpu_raw_entry_point_and_bad_input(gpu_server, small_model):
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    client = detect.connect(gpu_server.grpc_url)
    img = IMAGES["portrait"]
    inp = g.InferInput(names.IMAGE_RAW, [1, *img.shape], "UINT8")
    inp.set_data_from_numpy(img[None])
    assert_parity(torchvision_detect(small_model, img), _dets(client.infer(names.ENSEMBLE_RAW, [inp])), "raw on GPU")
    bad_input = np.zeros((1, 1, 3), np.uint8) if NUMPY2 else b"not an image"
    message = "smaller than the minimum side" if NUMPY2 else "not a decodable image"
    bad = detect.infer_many(client, [bad_input, payload(IMAGES["tiny"])], concurrency=2)
    assert isinstance(bad[0], InferenceServerException) and message in bad[0].message()
    assert not isinstance(bad[1], Exception)
    assert client.is_server_ready()
