"""JPEGs are decoded as torchvision users decode them (Pillow, libjpeg-turbo) by default, on every
device: chroma 4:2:0, 4:2:2 and 4:4:4, progressive, grayscale and CMYK.

On the CPU: the preprocess model (with Triton's python backend stood in) gives the NumPy transform
of Pillow's pixels for every kind, its requests decoded side by side by its thread pool, and the
configs carry the default decoder and thread count.  On a GPU (``-m gpu``): a real tritonserver on
the default ``--device gpu`` repository gives torchvision's detections on Pillow's pixels in fp32.
The CPU server's detections for the same kinds: ``tests/test_evaluate.py``.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import skimage.data
from tritonclient.grpc import model_config_pb2 as mc

import jpeg_kinds
import triton_fake as fake
from exporters.repository import RepositoryOptions, python_step_config, write_repository
from python_backend import backends, names
from python_backend.settings import DetectorSettings
from python_backend.triton_models import adapter as adapter_module

MODELS = adapter_module.__file__.rsplit("/", 1)[0]
NUMPY = backends.get_backend("cpu")
SETTINGS = DetectorSettings(num_classes=3, canvases=((64, 64),), min_size=48, max_size=64,
                            rpn_pre_nms_top_n=20, rpn_post_nms_top_n=10, fpn_channels=8, box_detections_per_img=5)
PHOTO = skimage.data.astronaut()[::8, ::8].copy()  # 64x64: the NumPy transform takes milliseconds
OUTS = (names.IMAGES, names.IMAGE_SIZES, names.ORIGINAL_SIZES)


def _preprocess(monkeypatch, **options):
    from pathlib import Path

    cfg = python_step_config(names.PREPROCESS, SETTINGS, RepositoryOptions(max_batch_size=8, **options))
    model = fake.load_model(Path(MODELS) / "preprocess.py", monkeypatch)()
    model.initialize(fake.model_args(cfg))
    return model


def _request(data: bytes):
    return fake.Request(**{names.IMAGE_BYTES: np.frombuffer(data, np.uint8)[None]})


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_every_jpeg_kind_is_decoded_to_pillows_pixels(monkeypatch, threads):
    """One execute of every kind and a bad file: each good request's outputs are the transform of
    Pillow's pixels, bit for bit; the bad one fails alone; with more than one thread the decoding
    runs on the pool's threads."""
    from python_backend.triton_io import decode_threads

    model = _preprocess(monkeypatch, decode_threads=threads)
    assert (model.pool is not None) == (decode_threads(str(threads)) > 1)
    seen = set()
    decode = model._images

    def recording(payload):
        seen.add(threading.current_thread().name)
        return decode(payload)

    model._images = recording
    jpegs = {kind: jpeg_kinds.jpeg(PHOTO, kind) for kind in jpeg_kinds.KINDS}
    for kind, data in jpegs.items():
        jpeg_kinds.check_kind(data, kind)
    requests = [_request(d) for d in jpegs.values()] + [_request(b"\xff\xd8\xff garbage")]
    responses = model.execute(requests)
    for (kind, data), response in zip(jpegs.items(), responses):
        assert not response.has_error(), f"{kind}: {response.error().message()}"
        want = NUMPY.preprocess_batch([jpeg_kinds.pillow_pixels(data)], SETTINGS)
        for name, expected in zip(OUTS, want):
            np.testing.assert_array_equal(response.output(name), expected, err_msg=f"{kind} {name}")
    assert responses[-1].has_error() and "bad input image" in responses[-1].error().message()
    if model.pool is not None:
        assert seen and all(n.startswith("decode") for n in seen), seen
    else:
        assert seen == {threading.current_thread().name}


def test_a_missing_input_is_its_requests_error_on_the_threaded_path(monkeypatch):
    model = _preprocess(monkeypatch, decode_threads=2)
    responses = model.execute([fake.Request(), _request(jpeg_kinds.jpeg(PHOTO, "4:2:0"))])
    assert responses[0].has_error() and not responses[1].has_error()


def test_decode_threads_parameter():
    from python_backend.triton_io import MAX_AUTO_THREADS, decode_threads

    assert decode_threads("3") == 3 and 1 <= decode_threads("0") <= MAX_AUTO_THREADS
    with pytest.raises(ValueError, match="decode_threads must be >= 0"):
        decode_threads("-1")
    with pytest.raises(ValueError, match="decode_threads must be >= 0"):
        RepositoryOptions(decode_threads=-1)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_pillow_is_the_default_decoder_on_every_device(device):
    """The repository's and the command's defaults: Pillow, threads one per CPU ("0")."""
    from fasterrcnn.options import Options

    cfg: mc.ModelConfig = python_step_config(names.PREPROCESS, SETTINGS, RepositoryOptions(device=device))
    assert cfg.parameters["jpeg_decoder"].string_value == "pillow"
    assert cfg.parameters["decode_threads"].string_value == "0"
    options = Options(device=device)
    assert options.jpeg_decoder == "pillow" and options.repository_options().jpeg_decoder == "pillow"
    assert Options(device=device, decode_threads=4).repository_options().decode_threads == 4


# --- on a GPU: the default --device gpu repository in a real tritonserver ------------------------------

def _cuda_devices() -> int:
    try:
        import cupy as cp

        return cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001  no CuPy, no driver
        return 0


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(_cuda_devices() == 0, reason="no CUDA device with CuPy (the GPU preprocess)")
def test_gpu_server_gives_torchvisions_detections_for_every_jpeg_kind(small_export, small_model, tmp_path):
    """``RepositoryOptions(device="gpu")`` with every other option at its default: each JPEG kind of a
    photograph, sent alone and then all at once through the encoded entry point, gets torchvision's
    fp32 detections on Pillow's pixels (the parity criterion)."""
    from client import detect
    from evaluation.parity import assert_parity, from_packed, torchvision_detect
    from fasterrcnn.server import TritonServer, free_port

    settings, paths = small_export
    write_repository(tmp_path, settings, paths, RepositoryOptions(device="gpu", max_batch_size=4), link=True)
    srv = TritonServer(tmp_path, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       cuda_pool_bytes=1 << 30)
    srv.start(timeout=300)
    try:
        client = detect.connect(srv.grpc_url)
        photo = skimage.data.astronaut()
        jpegs = {kind: jpeg_kinds.jpeg(photo, kind) for kind in jpeg_kinds.KINDS}
        reference = {k: torchvision_detect(small_model, jpeg_kinds.pillow_pixels(d)) for k, d in jpegs.items()}
        for concurrency in (1, len(jpegs)):
            results = detect.infer_many(client, list(jpegs.values()), concurrency=concurrency)
            for (kind, _), res in zip(jpegs.items(), results):
                assert not isinstance(res, Exception), f"{kind}: {res}\n--- server log ---\n{srv.log_text()[-4000:]}"
                ours = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                              names.DETECTION_LABELS, names.NUM_DETECTIONS)))
                assert_parity(reference[kind], ours, f"{kind} JPEG on the GPU server (concurrency {concurrency})")
    finally:
        srv.stop()
