"""Detection postprocessing: ``postprocess_detections`` of every backend against torchvision's
RoIHeads.postprocess_detections + resize_boxes (and, on the GPU, the NumPy reference), on
batches with empty images, a filler RoI, score ties and scores exactly at the threshold; the
reference's per-image stages against torchvision; bad inputs."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import resize_boxes

from op_cases import (  # noqa: F401  (backend, gpu_backend: fixtures)
    ATOL, COCO_SETTINGS, SMALL_SETTINGS, backend, gpu_backend, header_outputs, host, image_sizes_for,
    random_boxes, reference, tv_model,
)
from python_backend.reference.boxes import clip_boxes, decode_boxes
from python_backend.reference.detection import pack_detections, postprocess_image, rescale_boxes


def roi_heads_inputs(rng, num_rois, num_classes, image_size, case):
    """Proposals, class logits and box regression of one image, as RoIHeads receives them."""
    h, w = image_size
    proposals = clip_boxes(random_boxes(rng, num_rois, extent=max(h, w), max_side=150), h, w)
    logits = rng.normal(0, 2, size=(num_rois, num_classes)).astype(np.float32)
    if case == "none_above_threshold":
        logits[:, 0] += 20  # background wins everywhere: every class score < 0.05
    if case == "at_threshold":
        # softmax([log 16, 0, 0, 0, 0]) is exactly float32(0.05) for the four classes; torchvision
        # keeps only scores > thresh, compared in float32.
        logits[::2] = np.array([math.log(16.0), 0, 0, 0, 0], dtype=np.float32)
    regression = rng.normal(0, 1, size=(num_rois, 4 * num_classes)).astype(np.float32)
    regression[:5] *= 40  # boxes that leave the image and degenerate after clipping
    return proposals, logits, regression


def torchvision_detections(proposals, logits, regression, image_size, original_size):
    """RoIHeads.postprocess_detections, then GeneralizedRCNNTransform.postprocess's resize_boxes."""
    heads = tv_model().roi_heads
    boxes, scores, labels = heads.postprocess_detections(
        torch.from_numpy(logits), torch.from_numpy(regression), [torch.from_numpy(proposals)], [image_size])
    boxes = resize_boxes(boxes[0], list(image_size), list(original_size))
    return boxes.numpy(), scores[0].numpy(), labels[0].numpy()


CASES = [("random", 1000), ("random", 3), ("zero_rois", 0), ("none_above_threshold", 300), ("at_threshold", 40)]


@pytest.mark.parametrize("case, num_rois", CASES)
@pytest.mark.parametrize("decoder", ["torchvision", "reference"])
def test_postprocess_image_matches_roi_heads(case, num_rois, decoder):
    """The reference's per-image stage against RoIHeads.postprocess_detections."""
    settings = SMALL_SETTINGS
    rng = np.random.default_rng(num_rois)
    num_classes, image_size = settings.num_classes, (240, 320)
    proposals, logits, regression = roi_heads_inputs(rng, num_rois, num_classes, image_size, case)
    heads = tv_model().roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (
        settings.box_score_thresh, settings.box_nms_thresh, settings.box_detections_per_img)
    boxes_t, scores_t, labels_t = heads.postprocess_detections(
        torch.from_numpy(logits), torch.from_numpy(regression), [torch.from_numpy(proposals)], [image_size])

    scores = F.softmax(torch.from_numpy(logits), -1).numpy()
    if case == "none_above_threshold":
        assert num_rois > 0 and scores[:, 1:].max() <= settings.box_score_thresh
    if case == "at_threshold":
        assert (scores[::2, 1:] == np.float32(settings.box_score_thresh)).all()
    if decoder == "torchvision":
        decoded = heads.box_coder.decode(torch.from_numpy(regression), [torch.from_numpy(proposals)]).numpy()
    else:
        decoded = decode_boxes(regression, proposals, settings.box_coder_weights, settings.bbox_xform_clip)
    boxes, out_scores, labels = postprocess_image(
        scores, decoded.reshape(num_rois, num_classes, 4), image_size, settings.box_score_thresh,
        settings.box_min_size, settings.box_nms_thresh, settings.box_detections_per_img)
    np.testing.assert_array_equal(labels, labels_t[0].numpy())
    np.testing.assert_allclose(boxes, boxes_t[0].numpy(), rtol=0, atol=1e-4)  # boxes in pixels, up to ~320
    np.testing.assert_allclose(out_scores, scores_t[0].numpy(), rtol=0, atol=ATOL)
    assert boxes.dtype == out_scores.dtype == np.float32 and labels.dtype == np.int64
    if case in ("zero_rois", "none_above_threshold"):
        assert len(labels) == 0
    elif num_rois == 1000:
        assert len(labels) == settings.box_detections_per_img  # the top-k cut is exercised
    else:
        assert len(labels) > 0


def test_postprocess_detections_matches_torchvision(backend):
    """A batch of every CASES image (one of them empty) plus a filler RoI that counts for no
    image, against torchvision image by image: packed, rescaled to the original size."""
    settings = SMALL_SETTINGS
    rng = np.random.default_rng(12)
    sizes = np.array([(240, 320), (320, 213), (256, 256), (320, 240), (180, 320)], np.float32)
    originals = np.array([(480, 640), (1500, 1000), (7, 7), (640, 480), (333, 592)], np.float32)
    heads = tv_model().roi_heads
    scores, boxes, expected = [], [], []
    for (case, n), size, original in zip(CASES, sizes, originals):
        size, original = tuple(int(v) for v in size), tuple(int(v) for v in original)
        proposals, logits, regression = roi_heads_inputs(rng, n, settings.num_classes, size, case)
        expected.append(torchvision_detections(proposals, logits, regression, size, original))
        scores.append(F.softmax(torch.from_numpy(logits), -1).numpy())
        boxes.append(heads.box_coder.decode(torch.from_numpy(regression), [torch.from_numpy(proposals)])
                     .numpy().reshape(n, settings.num_classes, 4))
    counts = [len(s) for s in scores]
    scores = np.concatenate(scores + [np.full((1, settings.num_classes), 0.9, np.float32)])  # + a filler row
    boxes = np.concatenate(boxes + [np.tile(np.array([0, 0, 50, 50], np.float32), (1, settings.num_classes, 1))])
    out = host(backend, *backend.postprocess_batch(scores, boxes, np.array(counts), sizes, originals, settings))
    d = settings.box_detections_per_img
    assert [o.shape for o in out] == [(5, d, 4), (5, d), (5, d), (5, 1)]
    assert [o.dtype for o in out] == [np.float32, np.float32, np.int32, np.int32]
    for b, (e_boxes, e_scores, e_labels) in enumerate(expected):
        k = len(e_labels)
        assert out[3][b, 0] == k
        np.testing.assert_allclose(out[0][b, :k], e_boxes, rtol=1e-6, atol=1e-4)  # pixels, up to 1500
        np.testing.assert_allclose(out[1][b, :k], e_scores, rtol=0, atol=ATOL)
        np.testing.assert_array_equal(out[2][b, :k], e_labels)
        assert not out[0][b, k:].any() and not out[1][b, k:].any() and not out[2][b, k:].any()
    assert out[3][0, 0] == d and out[3][2, 0] == 0 and out[3][3, 0] == 0


@pytest.mark.parametrize("ties", [False, True])
def test_fast_path_matches_reference(gpu_backend, ties):
    """91 classes, 1000 / 0 / 357 / 1 RoIs and a filler row: identical to the reference bit for
    bit, ties in the reference's order."""
    rng = np.random.default_rng(21 + ties)
    counts = [1000, 0, 357, 1]
    sizes = image_sizes_for(len(counts))
    originals = np.array([[480, 640], [300, 300], [1200, 1600], [640, 480]], np.float32)
    parts = [header_outputs(rng, n, 91, s, ties) for n, s in zip(counts, sizes)]
    scores = np.concatenate([p[0] for p in parts] + [np.zeros((1, 91), np.float32)])  # + a filler row
    boxes = np.concatenate([p[1] for p in parts] + [np.zeros((1, 91, 4), np.float32)])
    args = (scores, boxes, counts, sizes, originals, COCO_SETTINGS)
    got = host(gpu_backend, *gpu_backend.postprocess_batch(*args))
    expected = reference().postprocess_batch(*args)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)
    assert got[3][0, 0] == COCO_SETTINGS.box_detections_per_img  # the full image fills every slot


@pytest.mark.parametrize("num_rois", [0, 1, 40])
def test_fast_path_single_image(gpu_backend, num_rois):
    rng = np.random.default_rng(num_rois)
    scores, boxes = header_outputs(rng, num_rois, 91, (800, 1066))
    settings = dataclasses.replace(COCO_SETTINGS, box_score_thresh=0.01)
    args = (scores, boxes, [num_rois], np.array([[800, 1066]], np.float32), np.array([[600, 800]], np.float32),
            settings)
    got = host(gpu_backend, *gpu_backend.postprocess_batch(*args))
    expected = reference().postprocess_batch(*args)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)
    assert num_rois < 40 or expected[3][0, 0] > 0, "no detection: the comparison is vacuous"


def test_score_exactly_at_threshold_is_dropped(backend):
    """Only scores > thresh are kept, compared in float32; just above it, every class of every
    RoI is kept once (the RoIs are identical, NMS keeps one per class)."""
    boxes = np.tile(np.array([10, 10, 50, 50], np.float32), (6, 5, 1))
    sizes = np.array([[100, 100]], np.float32)
    for score, kept in ((0.05, 0), (np.nextafter(np.float32(0.05), np.float32(1)), 4)):
        scores = np.full((6, 5), score, np.float32)
        out = backend.ops.postprocess_detections(scores, boxes, [6], sizes, sizes, 0.05, 1e-2, 0.5, 100)
        assert int(host(backend, out[3])[0, 0]) == kept


BAD = dict(scores=np.zeros((4, 3), np.float32), boxes=np.zeros((4, 3, 4), np.float32), counts=np.array([1, 3]),
           sizes=np.ones((2, 2), np.float32), originals=np.ones((2, 2), np.float32))


@pytest.mark.parametrize("change, error, message", [
    ({"scores": np.zeros(4, np.float32)}, ValueError, r"class_scores should be \[R, C\], got shape \(4,\)"),
    ({"boxes": np.zeros((4, 12), np.float32)}, ValueError,
     r"class_boxes should be \[R, C, 4\] = \[4, 3, 4\] like class_scores, got shape \(4, 12\)"),
    ({"boxes": np.zeros((4, 3, 5), np.float32)}, ValueError, r"class_boxes should be \[R, C, 4\]"),
    ({"scores": np.zeros((4, 3), np.int32)}, TypeError, "class_scores should be a floating-point array"),
    ({"boxes": np.zeros((4, 3, 4), np.int32)}, TypeError, "class_boxes should be a floating-point array"),
    ({"counts": np.array([2, 3])}, ValueError, r"counts \[2, 3\] do not fit the 4 rows of class_scores"),
    ({"counts": np.array([-1, 3])}, ValueError, r"counts \[-1, 3\] do not fit"),
    ({"counts": np.array([[1], [3]])}, ValueError, r"counts should be a 1d array \[B\], got shape \(2, 1\)"),
    ({"counts": np.array([1.0, 3.0])}, TypeError, "counts should be an integer array, got dtype float64"),
    ({"sizes": np.ones((3, 2), np.float32)}, ValueError,
     r"image_sizes should have one row per image, \[2, 2\], got shape \(3, 2\)"),
    ({"originals": np.ones(2, np.float32)}, ValueError, r"original_sizes should be \[B, 2\] .*got shape \(2,\)"),
])
def test_rejects_bad_input(backend, change, error, message):
    a = {**BAD, **change}
    with pytest.raises(error, match=message):
        backend.ops.postprocess_detections(a["scores"], a["boxes"], a["counts"], a["sizes"], a["originals"],
                                           0.05, 1e-2, 0.5, 100)


@pytest.mark.parametrize("resized, original", [
    ((256, 320), (480, 600)), ((228, 320), (5, 7)), ((300, 300), (300, 300)), ((320, 106), (1000, 333)),
])
def test_rescale_boxes_matches_resize_boxes(resized, original):
    """GeneralizedRCNNTransform.postprocess calls resize_boxes(boxes, resized, original)."""
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 100, extent=max(resized), max_side=100)
    expected = resize_boxes(torch.from_numpy(boxes), list(resized), list(original)).numpy()
    np.testing.assert_array_equal(rescale_boxes(boxes, resized, original), expected)
    assert rescale_boxes(np.zeros((0, 4), np.float32), resized, original).shape == (0, 4)


@pytest.mark.parametrize("n", [0, 3, 100, 130])
def test_pack_detections(n):
    rng = np.random.default_rng(n)
    boxes, scores = random_boxes(rng, n), rng.random(n, dtype=np.float32)
    labels = rng.integers(1, 91, n)
    out_boxes, out_scores, out_labels, count = pack_detections(boxes, scores, labels, 100)
    k = min(n, 100)
    assert (out_boxes.shape, out_scores.shape, out_labels.shape, count.shape) == ((100, 4), (100,), (100,), (1,))
    assert (out_boxes.dtype, out_scores.dtype, out_labels.dtype, count.dtype) == (
        np.float32, np.float32, np.int32, np.int32)
    assert count[0] == k
    np.testing.assert_array_equal(out_boxes[:k], boxes[:k])
    np.testing.assert_array_equal(out_scores[:k], scores[:k])
    np.testing.assert_array_equal(out_labels[:k], labels[:k])
    assert not out_boxes[k:].any() and not out_scores[k:].any() and not out_labels[k:].any()
