"""The NumPy reference's elementwise box operations and BoxCoder decoding against torchvision
(stages of the reference that the operators are built from; the GPU path fuses them into its
kernels, tested through the operators in ``test_ops_*.py``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as box_ops

from op_cases import random_boxes
from python_backend.reference.boxes import box_area, clip_boxes, decode_boxes, small_box_mask

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def test_box_area_clip_and_small_boxes_match_torchvision():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 500, extent=400) - np.float32(50)  # many cross the border
    boxes[:20, 2:] = boxes[:20, :2]  # zero-size
    boxes[20:40, 2] = boxes[20:40, 0] + np.float32(5e-4)  # thinner than rpn_min_size
    t = torch.from_numpy(boxes)
    np.testing.assert_array_equal(box_area(boxes), box_ops.box_area(t).numpy())
    clipped = clip_boxes(boxes, 240, 320)
    np.testing.assert_array_equal(clipped, box_ops.clip_boxes_to_image(t, (240, 320)).numpy())
    assert (clipped != boxes).any(), "no box crossed the border: the clip case is vacuous"
    for min_size in (1e-3, 1e-2, 16.0):
        mask = small_box_mask(clipped, min_size)
        np.testing.assert_array_equal(
            np.flatnonzero(mask), box_ops.remove_small_boxes(torch.from_numpy(clipped), min_size).numpy())
        assert 0 < mask.sum() < len(mask)


@pytest.mark.parametrize("weights", [BOX_CODER_WEIGHTS, (1.0, 1.0, 1.0, 1.0)])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_decode_boxes_matches_box_coder(weights, num_classes):
    rng = np.random.default_rng(1)
    n = 1000
    boxes = random_boxes(rng, n, extent=1000, max_side=500)
    boxes[0, 2:] = boxes[0, :2]  # zero-size reference box
    deltas = rng.normal(0, 1, size=(n, 4 * num_classes)).astype(np.float32)
    deltas[1:50, 2::4] = np.float32(50)  # huge dw, dh: clamped by bbox_xform_clip
    deltas[50:100, 3::4] = np.float32(1e4)
    deltas[100:150, 2:4] = np.float32(-30)  # tiny boxes
    coder = BoxCoder(weights)  # default bbox_xform_clip = log(1000 / 16)
    expected = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()
    out = decode_boxes(deltas, boxes, weights, BBOX_XFORM_CLIP)
    assert out.shape == (n, 4 * num_classes) and out.dtype == np.float32
    # np.exp and torch.exp differ by an ulp at times; x1, x2 = ctr -+ w / 2 then inherit an error of
    # a few ulps of max(|x1|, |x2|) = |ctr| + w / 2, the size of the pair's intermediates.
    pairs = np.abs(expected).reshape(n, num_classes, 2, 2)
    scale = np.tile(np.maximum(pairs[:, :, 0], pairs[:, :, 1]), (1, 1, 2)).reshape(n, -1)  # x1 y1 x2 y2
    assert (np.abs(out - expected) <= 4 * np.finfo(np.float32).eps * scale).all()
    assert np.isfinite(out).all()
    # Clamped: the widest box is exp(clip) * width, not exp(50 / ww) * width.
    pred_w = out[1:50, 2] - out[1:50, 0]
    ref_w = boxes[1:50, 2] - boxes[1:50, 0]
    np.testing.assert_allclose(pred_w, np.exp(BBOX_XFORM_CLIP) * ref_w, rtol=1e-5)
