"""``filter_proposals`` of every backend against torchvision's RegionProposalNetwork.filter_proposals
and its per-class batched_nms (and, on the GPU, the NumPy reference): batches of up to 8 images
x 4390 proposals, score ties, padding rows, empty input, bad inputs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from op_cases import (  # noqa: F401  (backend, gpu_backend: fixtures)
    COCO_SETTINGS, backend, gpu_backend, image_sizes_for, random_boxes, realistic_proposals, reference,
    tv_batched_vanilla, tv_model, valid_rois,
)
from python_backend.reference.boxes import small_box_mask
from python_backend.reference.detection import filter_image_proposals
from python_backend.settings import RPN_STRIDES, level_grid, padded_extent


def rpn_outputs(rng, image_size, num_anchors_per_level):
    """Random decoded proposals ``[1, A, 4]`` and objectness logits ``[1, A]`` for one image."""
    h, w = image_size
    total = sum(num_anchors_per_level)
    boxes = random_boxes(rng, total, extent=max(h, w), max_side=120) - np.float32(20)  # some outside
    flat = rng.random(total) < 0.03
    boxes[flat, 2] = boxes[flat, 0]  # zero width
    thin = rng.random(total) < 0.03
    boxes[thin, 3] = boxes[thin, 1] + np.float32(5e-4)  # height < rpn min_size
    # Distinct probabilities: torchvision reorders > 1000 kept boxes with an unstable sort, so the
    # order of tied scores is not defined (test_ops_nms.py test_batched_nms_ties_many_boxes).
    logits = rng.permutation(np.linspace(-5, 5, total)).astype(np.float32)
    return torch.from_numpy(boxes)[None], torch.from_numpy(logits)[None]


def proposal_rows(props, obj, image_size, num_anchors_per_level, pre_nms_top_n, pad_to):
    """The same candidates as rows ``x1 y1 x2 y2 prob level``, as the rpn network emits them:
    top-k per level by logit, clipped, sigmoid, then padding rows of level -1."""
    h, w = image_size
    rows, start = [], 0
    for level, n in enumerate(num_anchors_per_level):
        k = min(pre_nms_top_n, n)
        _, top = obj[0, start:start + n].topk(k)  # torchvision _get_top_n_idx
        idx = (top + start).numpy()
        b = box_ops.clip_boxes_to_image(props[0, idx], image_size).numpy()
        prob = torch.sigmoid(obj[0, idx]).numpy()
        rows.append(np.concatenate([b, prob[:, None], np.full((k, 1), level, np.float32)], 1))
        # Padding rows that would win every NMS if they counted: huge, certain boxes.
        rows.append(np.tile(np.array([[0, 0, w, h, 1.0, -1]], dtype=np.float32), (pad_to - k, 1)))
        start += n
    return np.concatenate(rows)


@pytest.mark.parametrize("score_thresh, post_nms_top_n", [
    (0.0, 1000), (0.6, 1000), (0.0, 50),
    ("last_kept", 5000),  # threshold exactly at a kept probability: kept, since torchvision uses >=
])
def test_filter_proposals_matches_rpn(backend, score_thresh, post_nms_top_n):
    """A batch of two images, each compared with torchvision's rpn run on that image alone."""
    model = tv_model()
    rpn = RegionProposalNetwork(
        model.rpn.anchor_generator, model.rpn.head, 0.7, 0.3, 256, 0.5,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=post_nms_top_n),
        nms_thresh=0.7, score_thresh=0.0 if score_thresh == "last_kept" else score_thresh,
    ).eval()
    image_size = (256, 320)
    padded = (padded_extent(256), padded_extent(320))
    num_anchors = [3 * level_grid(padded[0], s) * level_grid(padded[1], s) for s in RPN_STRIDES]
    rng = np.random.default_rng(post_nms_top_n + (score_thresh == 0.6))
    images = [rpn_outputs(rng, image_size, num_anchors) for _ in range(2)]
    if score_thresh == "last_kept":
        _, kept_scores = rpn.filter_proposals(*images[0], [image_size], num_anchors)
        score_thresh = rpn.score_thresh = float(kept_scores[0][-1])
    rows = np.stack([proposal_rows(props, obj, image_size, num_anchors, rpn.pre_nms_top_n(), pad_to=1000)
                     for props, obj in images])
    kept = backend.ops.filter_proposals(rows, rpn.min_size, score_thresh, 0.7, post_nms_top_n)
    rois, roi_img, counts = valid_rois(backend, kept)
    assert rois.dtype == np.float32 and roi_img.dtype == counts.dtype == np.int32
    start = 0
    for b, (props, obj) in enumerate(images):
        live = rows[b][rows[b][:, 5] >= 0]
        assert len(np.unique(live[:, 4])) == len(live) and len(live) < len(rows[b])
        expected, expected_scores = rpn.filter_proposals(props, obj, [image_size], num_anchors)
        expected = expected[0].numpy()
        assert counts[b] == len(expected)
        np.testing.assert_array_equal(rois[start:start + counts[b]], expected)
        np.testing.assert_array_equal(roi_img[start:start + counts[b]], b)
        start += counts[b]
        assert 0 < counts[b] <= post_nms_top_n
        assert counts[b] == post_nms_top_n or score_thresh > 0
        if post_nms_top_n == 5000 and b == 0:
            assert expected_scores[0].numpy()[-1] == np.float32(score_thresh)
    assert start == len(rois) == kept.total()


def test_filter_proposals_matches_torchvision_batched_nms(backend):
    """torchvision's per-class batched_nms (on CUDA when present) over each image's live rows,
    then top-n; the scores have no ties, so the order must match too."""
    rng = np.random.default_rng(3)
    sizes = image_sizes_for(4)
    props = np.stack([realistic_proposals(rng, s) for s in sizes])
    s = COCO_SETTINGS
    rois, _, counts = valid_rois(backend, backend.ops.filter_proposals(props, s.rpn_min_size, 0.0,
                                                                      s.rpn_nms_thresh, 1000))
    row = 0
    for b in range(4):
        p = props[b]
        p = p[p[:, 5] >= 0]
        p = p[small_box_mask(p[:, :4], s.rpn_min_size)]
        keep = tv_batched_vanilla(p[:, :4], p[:, 4], p[:, 5].astype(np.int64), s.rpn_nms_thresh)[:1000]
        assert counts[b] == len(keep) > 0
        np.testing.assert_array_equal(rois[row:row + counts[b]], p[keep, :4])
        row += counts[b]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_fast_path_matches_reference(gpu_backend, batch, ties):
    """Up to 8 images x 4390 proposals in one call: each image's RoIs, their order and their
    image index identical to the NumPy reference's, with and without score ties."""
    rng = np.random.default_rng(batch + 10 * ties)
    sizes = image_sizes_for(batch)
    props = np.stack([realistic_proposals(rng, s, ties) for s in sizes])
    for s in (COCO_SETTINGS, dataclasses.replace(COCO_SETTINGS, rpn_score_thresh=0.3, rpn_post_nms_top_n=300)):
        args = (s.rpn_min_size, s.rpn_score_thresh, s.rpn_nms_thresh, s.rpn_post_nms_top_n)
        rois, roi_img, counts = valid_rois(gpu_backend, gpu_backend.ops.filter_proposals(props, *args))
        ref = reference().ops.filter_proposals(props, *args)
        np.testing.assert_array_equal(counts, ref.counts)
        np.testing.assert_array_equal(rois, ref.rois)
        np.testing.assert_array_equal(roi_img, ref.roi_img)
        assert 0 < counts.min() and counts.max() <= s.rpn_post_nms_top_n
        for b in range(batch):  # the reference's batch is its per-image stage, image by image
            np.testing.assert_array_equal(ref.rois[ref.roi_img == b], filter_image_proposals(props[b], *args))


def test_only_padding_rows(backend):
    props = np.tile(np.array([[0, 0, 50, 50, 0.9, -1]], dtype=np.float32), (2, 50, 1))
    rois, roi_img, counts = valid_rois(backend, backend.ops.filter_proposals(props, 1e-3, 0.0, 0.7, 1000))
    np.testing.assert_array_equal(counts, [0, 0])
    assert rois.shape == (0, 4) and roi_img.shape == (0,)


@pytest.mark.parametrize("shape", [(0, 10, 6), (3, 0, 6)])
def test_empty_batch(backend, shape):
    rois, _, counts = valid_rois(backend, backend.ops.filter_proposals(np.zeros(shape, np.float32),
                                                                      1e-3, 0.0, 0.7, 1000))
    np.testing.assert_array_equal(counts, np.zeros(shape[0]))
    assert rois.shape == (0, 4)


@pytest.mark.parametrize("proposals, top_n, error, message", [
    (np.zeros((2, 10, 5), np.float32), 10, ValueError, r"proposals should be \[B, K, 6\] .*got shape \(2, 10, 5\)"),
    (np.zeros((10, 6), np.float32), 10, ValueError, r"proposals should be \[B, K, 6\] .*got shape \(10, 6\)"),
    (np.zeros((2, 10, 6), np.int32), 10, TypeError, "proposals should be a floating-point array, got dtype int32"),
    (np.zeros((2, 10, 6), np.float32), 0, ValueError, "post_nms_top_n must be positive, got 0"),
])
def test_rejects_bad_input(backend, proposals, top_n, error, message):
    with pytest.raises(error, match=message):
        backend.ops.filter_proposals(proposals, 1e-3, 0.0, 0.7, top_n)


def test_fast_path_rejects_too_many_proposals(gpu_backend):
    """One image's keys sort in shared memory: at most 8192 proposals per image."""
    with pytest.raises(ValueError, match="8193 proposals per image, expected at most 8192"):
        gpu_backend.ops.filter_proposals(np.zeros((1, 8193, 6), np.float32), 1e-3, 0.0, 0.7, 1000)
