"""End to end against a real tritonserver (the nvidia-pytriton wheel's) started by a fixture.

The repository is the small test model's with its default canvases (256x256, 256x320, 320x256:
the "auto" logic that gives the five canvases at 800/1333), so images of every orientation and
shape are served, each request on the smallest canvas that holds it.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import skimage.data

from client import detect
from fasterrcnn.server import ServerError, TritonServer, free_port
from conftest import SMALL
from exporters.export import ModelOptions
from exporters.repository import RepositoryOptions, write_repository
from evaluation.parity import assert_parity, from_packed, torchvision_detect
from evaluation.payloads import encode, textured_image
from python_backend import names

pytestmark = pytest.mark.triton
tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_BATCH = 4


def _ports():
    return dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())


@pytest.fixture(scope="module")
def server(small_export, tmp_path_factory):
    settings, paths = small_export
    repo = tmp_path_factory.mktemp("triton_repo")
    # a long queue delay so concurrent requests are batched
    # the small model's weights as an export records them (seeded random): detect warns about them
    weights = ModelOptions(weights="random", seed=SMALL["seed"], num_classes=SMALL["num_classes"]).weights_record()
    write_repository(repo, settings, paths, RepositoryOptions(max_batch_size=MAX_BATCH, queue_delay_us=200_000),
                     link=True, weights=weights)
    srv = TritonServer(repo, **_ports())
    try:
        srv.start(timeout=240)
    except ServerError as e:
        pytest.fail(str(e))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return detect.connect(server.grpc_url)


# a 24-megapixel portrait photo (6000 x 4000) as JPEG: as PNG, 24 megapixels of texture would be tens of MB
LARGE_JPEG = encode(np.repeat(np.repeat(textured_image(600, 400, seed=9), 10, axis=0), 10, axis=1), "JPEG",
                    quality=90)


def _decoded(data: bytes) -> np.ndarray:
    """The pixels the server decodes (Pillow), which torchvision's reference runs on."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


IMAGES = {
    "astronaut": skimage.data.astronaut(),  # square
    "coffee": skimage.data.coffee(),  # landscape
    "portrait": textured_image(400, 240, seed=1),
    "tiny": textured_image(12, 20, seed=2),
    "landscape": textured_image(240, 400, seed=3),
    "square": textured_image(300, 300, seed=4),
    "1:16": textured_image(40, 640, seed=5),
    "16:1": textured_image(640, 40, seed=6),
    "20x20": textured_image(20, 20, seed=7),
    "one row": textured_image(1, 16, seed=7),  # 1xN: resizes to 20 x 320
    "large": _decoded(LARGE_JPEG),
}


def _payload(name: str) -> bytes:
    """The request's bytes: PNG (lossless, so torchvision sees the same pixels), the large one its JPEG."""
    return LARGE_JPEG if name == "large" else encode(IMAGES[name])


@pytest.fixture(scope="module")
def reference(small_model):
    return {k: torchvision_detect(small_model, v) for k, v in IMAGES.items()}


def _detections(result):
    return from_packed(*(result.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                       names.DETECTION_LABELS, names.NUM_DETECTIONS)))


def test_model_metadata_is_what_the_client_expects(client):
    config = detect.check_model(client)
    assert len(detect.class_names(config)) == 91


@pytest.mark.parametrize("name", list(IMAGES))
def test_single_request_matches_torchvision(client, reference, name):
    """Square, landscape, portrait, 1:16, 16:1, tiny, one row and 24 megapixels, each alone."""
    res = detect.infer_many(client, [_payload(name)])[0]
    assert not isinstance(res, Exception), res
    assert_parity(reference[name], _detections(res), f"gRPC {name}")
    assert res.as_numpy(names.DETECTION_BOXES).shape == (1, 100, 4)


def _batch_counts(client, model):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def _grown(client, model, before):
    after = _batch_counts(client, model)
    return {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}


def test_concurrent_mixed_shapes_match_torchvision(client, reference):
    """Every orientation and shape at once: each request on its own canvas, each image torchvision's
    detections (the rpn's batcher joins only requests on one canvas)."""
    order = ["astronaut", "portrait", "1:16", "tiny", "landscape", "16:1", "large", "square", "20x20", "one row",
             "coffee", "portrait"]
    results = detect.infer_many(client, [_payload(n) for n in order], concurrency=len(order))
    for name, res in zip(order, results):
        assert not isinstance(res, Exception), res
        assert_parity(reference[name], _detections(res), f"concurrent {name}")
    header = _batch_counts(client, names.HEADER)
    assert max(header) > 1000 // 2, f"header batches (RoIs) too small: {header}"


@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
def test_same_orientation_traffic_batches(client, reference, orientation):
    """Concurrent requests on one canvas: the rpn runs batches larger than 1 (Triton's statistics)."""
    order = ["coffee", "landscape", "tiny", "1:16"] if orientation == "landscape" else ["portrait", "16:1"] * 2
    before = _batch_counts(client, names.RPN)
    results = detect.infer_many(client, [_payload(n) for n in order], concurrency=len(order))
    for name, res in zip(order, results):
        assert not isinstance(res, Exception), res
        assert_parity(reference[name], _detections(res), f"{orientation} traffic {name}")
    grown = _grown(client, names.RPN, before)
    assert any(b > 1 for b in grown), f"rpn never ran a batch larger than 1: {grown}"


def test_one_request_carries_one_encoded_image(client):
    """Encoded images of several lengths can't be one rectangular tensor: [2, N] is refused with
    that reason, and the server keeps serving."""
    data = np.frombuffer(_payload("tiny"), np.uint8)
    inp = tritonclient.InferInput(names.IMAGE_BYTES, [2, data.size], "UINT8")
    inp.set_data_from_numpy(np.stack([data, data]))
    with pytest.raises(InferenceServerException, match=r"one encoded image per request \(\[1, N\] uint8\), got 2 "
                                                       r"rows: send each image as its own request"):
        client.infer(names.ENSEMBLE, [inp])
    assert client.is_server_ready()


def test_one_raw_request_with_several_images(client, reference, small_model):
    """Decoded images of one size are one tensor: a request of two gets both images' detections."""
    second = textured_image(400, 240, seed=21)
    pair = np.stack([IMAGES["portrait"], second])
    inp = tritonclient.InferInput(names.IMAGE_RAW, list(pair.shape), "UINT8")
    inp.set_data_from_numpy(pair)
    res = client.infer(names.ENSEMBLE_RAW, [inp])
    boxes, scores = res.as_numpy(names.DETECTION_BOXES), res.as_numpy(names.DETECTION_SCORES)
    labels, num = res.as_numpy(names.DETECTION_LABELS), res.as_numpy(names.NUM_DETECTIONS)
    for i, ref in enumerate((reference["portrait"], torchvision_detect(small_model, second))):
        assert_parity(ref, from_packed(boxes[i], scores[i], labels[i], num[i]), f"raw request of two, image {i}")


def test_raw_uint8_entry_point(client, reference):
    img = IMAGES["landscape"]
    inp = tritonclient.InferInput(names.IMAGE_RAW, [1, *img.shape], "UINT8")
    inp.set_data_from_numpy(img[None])
    res = client.infer(names.ENSEMBLE_RAW, [inp])
    assert_parity(reference["landscape"], _detections(res), "fasterrcnn_raw")


def _png_header(width, height):
    """A PNG that declares a size and carries no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _bad_payloads():
    jpeg = encode(IMAGES["coffee"], "JPEG")
    # A broken marker segment.  (Damage inside the entropy-coded data is not detectable: libjpeg,
    # and so Pillow and torchvision, decode it to wrong pixels without an error.)
    corrupt = bytearray(jpeg)
    corrupt[2:40] = bytes(range(38))
    return {
        "truncated jpeg": (jpeg[: len(jpeg) // 3], "corrupt or truncated"),
        "corrupt jpeg": (bytes(corrupt), "bad input image"),
        "random bytes": (np.random.default_rng(0).bytes(5000), "not a decodable image"),
        "empty": (b"", "empty input"),
        # torchvision's resize leaves it no row (and fails on it too)
        "line of 1x400": (encode(np.zeros((1, 400, 3), np.uint8)), "resizes to 0x320"),
        "decompression bomb": (_png_header(20000, 20000), "exceeds the limit"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_bad_image_gets_its_own_clear_error(client, case):
    data, message = _bad_payloads()[case]
    res = detect.infer_many(client, [data])[0]
    assert isinstance(res, InferenceServerException), f"{case}: expected an error, got detections"
    assert message in res.message(), res.message()


def test_bad_requests_beside_good_ones_in_one_batch(client, server, reference):
    bad = _bad_payloads()
    payloads = [_payload("tiny"), bad["truncated jpeg"][0], _payload("portrait"), bad["empty"][0],
                bad["random bytes"][0], _payload("tiny")]
    results = detect.infer_many(client, payloads, concurrency=len(payloads))
    for i in (0, 2, 5):
        assert not isinstance(results[i], Exception), results[i]
    assert_parity(reference["tiny"], _detections(results[0]), "good beside bad")
    assert_parity(reference["portrait"], _detections(results[2]), "good beside bad")
    for i in (1, 3, 4):
        assert isinstance(results[i], InferenceServerException)
    assert client.is_server_ready() and client.is_model_ready(names.ENSEMBLE)


def test_wrong_dtype_and_shape_are_rejected(client):
    inp = tritonclient.InferInput(names.IMAGE_BYTES, [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|expected.*UINT8"):
        client.infer(names.ENSEMBLE, [inp])
    inp = tritonclient.InferInput(names.IMAGE_BYTES, [1, 2, 2], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer(names.ENSEMBLE, [inp])
    raw = tritonclient.InferInput(names.IMAGE_RAW, [1, 8, 8, 4], "UINT8")
    raw.set_data_from_numpy(np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer(names.ENSEMBLE_RAW, [raw])
    too_many = tritonclient.InferInput(names.IMAGE_BYTES, [MAX_BATCH + 1, 4], "UINT8")
    too_many.set_data_from_numpy(np.zeros((MAX_BATCH + 1, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="(?i)batch"):
        client.infer(names.ENSEMBLE, [too_many])
    assert client.is_server_ready()


def test_client_cli_json_and_draw(server, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_payload("tiny"))
    (folder / "b.jpg").write_bytes(encode(IMAGES["coffee"], "JPEG"))
    code = detect.main([str(folder), "--url", server.grpc_url, "--concurrency", "2", "--draw", str(tmp_path / "out"),
                        "--json"])
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 and all('"detections"' in ln for ln in lines)
    assert "warning: the server's weights are random (seed 0, 91 classes): boxes and labels are meaningless" \
        in captured.err
    assert (tmp_path / "out" / "a.png.png").is_file() and (tmp_path / "out" / "b.jpg.png").is_file()


def test_client_checks_the_model(client):
    with pytest.raises(detect.ClientError, match=r"expected \['image'\], got"):
        detect.check_model(client, names.RPN)


def test_client_unreachable_server():
    with pytest.raises(detect.ClientError, match="cannot reach Triton"):
        detect.connect(f"127.0.0.1:{free_port()}")


def test_serve_reports_a_taken_port(server):
    with pytest.raises(ServerError, match=f"port {server.grpc_port} is already in use"):
        TritonServer(server.repository, grpc_port=server.grpc_port, http_port=free_port(),
                     metrics_port=free_port()).start()


def test_serve_reports_the_models_own_load_error(tmp_path):
    model = tmp_path / "repo" / "broken" / "1"
    model.mkdir(parents=True)
    (model.parent / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                               'input [{name: "x" data_type: TYPE_FP32 dims: [1]}]\n'
                                               'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]\n')
    (model / "model.py").write_text("class TritonPythonModel:\n    def initialize(self, args):\n"
                                    "        raise RuntimeError('checkpoint missing: /nowhere.pt')\n")
    with pytest.raises(ServerError, match="checkpoint missing: /nowhere.pt"):
        TritonServer(tmp_path / "repo", **_ports()).start(timeout=120)
