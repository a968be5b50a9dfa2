"""A bad request batched beside good ones, sent straight to each step model of a real tritonserver.

One small repository (the default canvases of the small resize in tests/conftest.py: 256x256,
256x320, 320x256) holds every step: preprocess, rpn and header through ONNX Runtime
(onnx_runner.py), rpn and header again through torch (torch_runner.py, as ``rpn_torch`` /
``header_torch``, the rpn traced per canvas), roi and postprocess.  The dynamic batcher
waits long enough that requests sent together share one ``execute`` (checked in the statistics).
In each batch the bad request must get an error naming what was wrong, and every good one the
values of an independent computation of that request alone: the NumPy reference steps, or the
eager torch modules the networks were exported from.

postprocess does not batch (``max_batch_size: 0``, each request has its own RoI count), and
Triton hands such a model one request per ``execute`` even with a dynamic batcher (seen with this
server); there the requests run side by side.  tests/test_adapter.py covers several postprocess
requests in one call.
"""
from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from exporters.repository import RepositoryOptions, read_config, write_repository
from exporters.split import HeaderNetwork, RpnNetwork
from exporters.tensorrt.compare import anchor_scaled_atol, proposal_mismatches
from evaluation.payloads import encode, textured_image
from evaluation.server import start_server
from python_backend import backends, names

pytestmark = pytest.mark.triton
tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

MAX_BATCH = 4
QUEUE_DELAY_US = 2_000_000  # requests sent together arrive well within it
NUMPY = backends.get_backend("cpu")
TORCH = "_torch"  # suffix of the torch runner's copies of rpn and header


@pytest.fixture(scope="module")
def server(small_export, small_traces, tmp_path_factory):
    settings, paths = small_export
    repo = tmp_path_factory.mktemp("isolation_repo")
    write_repository(repo, settings, paths, RepositoryOptions(max_batch_size=MAX_BATCH, queue_delay_us=QUEUE_DELAY_US),
                     link=True)
    torch_repo = tmp_path_factory.mktemp("torch_repo")
    write_repository(torch_repo, settings, {}, RepositoryOptions(target="torch", max_batch_size=MAX_BATCH,
                                                                 queue_delay_us=QUEUE_DELAY_US),
                     torch_models=small_traces[1], link=True)
    for name in (names.RPN, names.HEADER):
        folder = repo / f"{name}{TORCH}"
        shutil.copytree(torch_repo / name, folder, copy_function=os.link)  # links: the traces stay one file
        cfg = read_config(folder / "config.pbtxt")
        cfg.name = folder.name
        (folder / "config.pbtxt").unlink()  # a new file, not the linked one in torch_repo
        (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    for name in (names.ENSEMBLE, names.ENSEMBLE_RAW, names.PREPROCESS_RAW):
        shutil.rmtree(repo / name)
    with start_server(repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return tritonclient.InferenceServerClient(server.grpc_url)


def _batch_counts(client, model: str) -> dict[int, int]:
    """{batch size: executions} from the model's statistics."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def _infer(client, model: str, inputs: dict):
    tensors = []
    for name, array in inputs.items():
        t = tritonclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        tensors.append(t)
    try:
        return client.infer(model, tensors)
    except InferenceServerException as e:
        return e


def _together(client, model: str, requests: list[dict], batch: int | None = None) -> list:
    """Send ``requests`` at once; with ``batch``, check they ran as one execution of that batch size."""
    before = _batch_counts(client, model)
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _infer(client, model, r), requests))
    if batch is not None:
        # Triton may count an execution after its responses are out (a clean-clone run saw none
        # counted yet): wait until the executions counted hold ``batch`` items, at most 5 s
        deadline = time.monotonic() + 5
        while True:
            after = _batch_counts(client, model)
            grown = {b: n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}
            if sum(b * n for b, n in grown.items()) >= batch or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert grown == {batch: 1}, f"{model}: expected one execution of batch {batch}, got {grown}"
    return results


def _values(result, *output_names):
    assert not isinstance(result, Exception), result
    return [result.as_numpy(n) for n in output_names]


def _error(result) -> str:
    assert isinstance(result, InferenceServerException), "expected an error, got outputs"
    return result.message()


# --- inputs: a few images through the NumPy preprocess and the eager rpn ----------------------------

# landscape images (all on the 256x320 canvas, so the rpn's and roi's batcher may join them), and a
# portrait one for preprocess, which pads each request onto its own canvas
IMAGES = [textured_image(240, 400, seed=3), textured_image(200, 300, seed=4), textured_image(230, 320, seed=5)]
PORTRAIT = textured_image(400, 240, seed=6)
CANVAS = (256, 320)


@pytest.fixture(scope="module")
def rpn_inputs(small_export):
    """Preprocessed (images, image_sizes) of each of IMAGES, on the landscape canvas."""
    settings, _ = small_export
    out = [NUMPY.preprocess_batch([im], settings)[:2] for im in IMAGES]
    assert all(x.shape[-2:] == CANVAS for x, _ in out)
    return out


@pytest.fixture(scope="module")
def rpn_eager(small_model, small_export):
    settings, _ = small_export
    net = RpnNetwork(small_model, settings).eval()

    def run(images, sizes):
        with torch.no_grad():
            return [o.numpy() for o in net(torch.from_numpy(images), torch.from_numpy(sizes))]

    run.anchor_sizes = net.anchor_sizes()
    return run


def _cat(*arrays):
    return np.concatenate(arrays)


# --- the steps ----------------------------------------------------------------------------------

def _bytes(data: bytes) -> dict:
    """An encoded-image request: the N bytes as ``[1, N]`` uint8."""
    return {names.IMAGE_BYTES: np.frombuffer(data, np.uint8)[None]}


def test_preprocess(client, small_export):
    """Encodings of different lengths (and images on different canvases) share one execute
    (allow_ragged_batch); each good request gets its own canvas."""
    settings, _ = small_export
    requests = [_bytes(encode(IMAGES[0])), _bytes(b"GIF89a broken"), _bytes(encode(PORTRAIT)),
                _bytes(encode(IMAGES[1]))]
    results = _together(client, names.PREPROCESS, requests, batch=4)
    assert "bad input image: not a decodable image" in _error(results[1])
    outs = (names.IMAGES, names.IMAGE_SIZES, names.ORIGINAL_SIZES)
    for result, own, canvas in ((results[0], IMAGES[0], CANVAS), (results[2], PORTRAIT, (320, 256)),
                                (results[3], IMAGES[1], CANVAS)):
        got = _values(result, *outs)
        assert got[0].shape == (1, 3, *canvas)
        for g, want in zip(got, NUMPY.preprocess_batch([own], settings)):
            np.testing.assert_array_equal(g, want)


def _assert_rpn_outputs(got, want, what, anchor_sizes):
    """Maps to float32 summation order.  Proposals as sets per image and level (random weights
    give near-tied objectness, so two runtimes may order top-k rows differently or keep another
    of two rows tied at the cutoff), boxes to a tolerance that grows with the level's anchor
    (padding rows, level -1, with the smallest anchor's)."""
    for name, a, b in zip(names.FEATURES, want[1:], got[1:]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * np.abs(a).max(), err_msg=f"{what} {name}")
    atol = anchor_scaled_atol(anchor_sizes, box_atol=1e-2, anchor_rtol=1e-4, score_atol=1e-4)
    problems = proposal_mismatches(got[0], want[0], atol, rtol=1e-4, score_atol=1e-4)
    assert problems == [], f"{what}: " + "\n".join(problems[:10])


@pytest.mark.parametrize("model", [names.RPN, names.RPN + TORCH])
def test_rpn(client, rpn_inputs, rpn_eager, model):
    (x0, s0), (x1, s1), (x2, s2) = rpn_inputs
    good = [{names.IMAGES: x0, names.IMAGE_SIZES: s0}, {names.IMAGES: _cat(x1, x2), names.IMAGE_SIZES: _cat(s1, s2)}]
    bad = {names.IMAGES: x0, names.IMAGE_SIZES: np.array([[300, 200]], np.float32)}  # taller than the canvas
    results = _together(client, model, [good[0], bad, good[1]], batch=4)
    assert _error(results[1]).startswith("image_sizes[0] = (300, 200): expected a resized (height, width) "
                                         "within the 256x320 canvas")
    outs = (names.PROPOSALS, *names.FEATURES)
    for result, inputs in ((results[0], good[0]), (results[2], good[1])):
        want = rpn_eager(inputs[names.IMAGES], inputs[names.IMAGE_SIZES])
        _assert_rpn_outputs(_values(result, *outs), want, model, rpn_eager.anchor_sizes)
    # images on a size that is none of the canvases: no TensorRT profile or trace serves it
    odd = {names.IMAGES: np.zeros((1, 3, 288, 288), np.float32), names.IMAGE_SIZES: np.array([[288, 288]], np.float32)}
    assert _error(_infer(client, model, odd)) == ("images: a 288x288 canvas (height x width); expected one of the "
                                                 "canvases 256x256,256x320,320x256")


def _roi_request(rpn_out, sizes):
    return {names.PROPOSALS: rpn_out[0], **dict(zip(names.FEATURES, rpn_out[1:])), names.IMAGE_SIZES: sizes}


@pytest.fixture(scope="module")
def roi_requests(rpn_inputs, rpn_eager):
    """The roi step's good requests: one image, then two."""
    (x0, s0), (x1, s1), (x2, s2) = rpn_inputs
    return [_roi_request(rpn_eager(x0, s0), s0), _roi_request(rpn_eager(_cat(x1, x2), _cat(s1, s2)), _cat(s1, s2))]


def test_roi(client, small_export, roi_requests):
    settings, _ = small_export
    bad = dict(roi_requests[0], **{names.IMAGE_SIZES: np.array([[0, 200]], np.float32)})
    results = _together(client, names.ROI, [roi_requests[0], bad, roi_requests[1]], batch=4)
    assert _error(results[1]).startswith("image_sizes[0] = (0, 200): expected a resized (height, width)")
    p3 = names.FEATURES[1]
    wrong = dict(roi_requests[0], **{p3: np.ascontiguousarray(roi_requests[0][p3][:, :16])})  # P3 of 128 rows
    assert _error(_infer(client, names.ROI, wrong)) == (f"{p3}: expected a 32x40 map (the 256x320 canvas / 8), "
                                                       "got 16x40")
    for result, r in ((results[0], roi_requests[0]), (results[2], roi_requests[1])):
        want = NUMPY.roi_step(r[names.PROPOSALS], [r[n] for n in names.FEATURES], r[names.IMAGE_SIZES], settings)
        rois, feats, counts = _values(result, names.ROIS, names.ROI_FEATURES, names.NUM_ROIS)
        assert rois.shape[0] == int(want.counts.sum()) > 0
        np.testing.assert_array_equal(counts.reshape(-1), want.counts)
        np.testing.assert_allclose(rois, want.rois, rtol=0, atol=1e-6)
        np.testing.assert_allclose(feats, want.features, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def header_requests(small_export, roi_requests):
    """A few of the RoIs of each roi request (with their features), as header requests."""
    settings, _ = small_export
    out = []
    for r, n in zip(roi_requests, (40, 25)):
        b = NUMPY.roi_step(r[names.PROPOSALS], [r[f] for f in names.FEATURES], r[names.IMAGE_SIZES], settings)
        out.append({names.ROI_FEATURES: np.ascontiguousarray(b.features[:n]), names.ROIS: b.rois[:n]})
    return out


@pytest.fixture(scope="module")
def header_eager(small_model):
    net = HeaderNetwork(small_model).eval()

    def run(r):
        with torch.no_grad():
            return [o.numpy() for o in net(torch.from_numpy(r[names.ROI_FEATURES]), torch.from_numpy(r[names.ROIS]))]

    return run


@pytest.mark.parametrize("model", [names.HEADER, names.HEADER + TORCH])
def test_header(client, header_requests, header_eager, model):
    good = header_requests
    rois = good[1][names.ROIS][:10].copy()
    rois[3] = [50, 60, 40, 90]  # x2 < x1
    bad = {names.ROI_FEATURES: good[1][names.ROI_FEATURES][:10], names.ROIS: rois}
    results = _together(client, model, [good[0], bad, good[1]], batch=40 + 10 + 25)
    assert _error(results[1]) == ("rois[3] = [50.0, 60.0, 40.0, 90.0]: expected finite x1 y1 x2 y2 "
                                  "with x1 <= x2 and y1 <= y2")
    for result, r in ((results[0], good[0]), (results[2], good[1])):
        for got, want in zip(_values(result, names.CLASS_SCORES, names.CLASS_BOXES), header_eager(r)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=model)


def test_postprocess(client, small_export, header_requests, header_eager):
    settings, _ = small_export
    requests = []
    for r, sizes, originals in zip(header_requests, ([[192, 320]], [[213, 320], [230, 320]]),
                                   ([[240, 400]], [[200, 300], [230, 320]])):
        scores, boxes = header_eager(r)
        n = scores.shape[0]
        counts = [n] if len(sizes) == 1 else [n - 10, 10]
        requests.append({names.CLASS_SCORES: scores, names.CLASS_BOXES: boxes,
                         names.NUM_ROIS: np.array(counts, np.int32).reshape(-1, 1),
                         names.IMAGE_SIZES: np.array(sizes, np.float32),
                         names.ORIGINAL_SIZES: np.array(originals, np.float32)})
    bad = dict(requests[0], **{names.NUM_ROIS: np.array([[7]], np.int32)})
    results = _together(client, names.POSTPROCESS, [requests[0], bad, requests[1]])
    assert _error(results[1]).startswith("num_rois sums to 7 RoIs but class_scores has 40 rows")
    outs = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)
    for result, r in ((results[0], requests[0]), (results[2], requests[1])):
        want = NUMPY.postprocess_batch(r[names.CLASS_SCORES], r[names.CLASS_BOXES], r[names.NUM_ROIS].reshape(-1),
                                       r[names.IMAGE_SIZES], r[names.ORIGINAL_SIZES], settings)
        assert want[3].sum() > 0
        for got, expected in zip(_values(result, *outs), want):
            np.testing.assert_array_equal(got, expected)
    assert client.is_server_ready()
