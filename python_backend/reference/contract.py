"""The operator contract that the NumPy reference and the CuPy fast path share: the checks at
every operator's boundary, and the result type of proposal filtering.

Both implementations call these checks on their own arrays (NumPy or CuPy) before any work:
only ``shape``, ``ndim`` and ``dtype`` are read, so no check costs a device synchronization.
The errors read like torchvision's own input checks (``boxes should have 4 elements in
dimension 1, got 5``): ``ValueError`` for a shape, ``TypeError`` for a dtype, each naming the
bad value and what was expected.  Floating-point inputs of any precision are accepted and
computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class ProposalRois:
    """The RoIs that survive proposal filtering, image after image (``filter_proposals``).

    The buffers may hold more rows than there are RoIs: the CuPy path sizes them for
    ``B * post_nms_top_n`` rows so that nothing waits for the count; rows past ``num_rois``
    are unspecified.  The NumPy path's buffers hold exactly ``num_rois`` rows.
    """

    rois: Any  # [N, 4] float32 x1 y1 x2 y2, N >= num_rois
    roi_img: Any  # [N] int32: the image of each row
    counts: Any  # [B] int32: RoIs of each image
    num_rois: Any  # [1] int32: their sum (on the device for CuPy)

    def total(self) -> int:
        """``num_rois`` as a Python int (on the GPU, a host synchronization)."""
        return int(self.num_rois[0])


def shape_of(array) -> tuple[int, ...]:
    return tuple(int(s) for s in array.shape)


def check_floating(name: str, array) -> None:
    if array.dtype.kind != "f":
        raise TypeError(f"{name} should be a floating-point array, got dtype {array.dtype}")


def check_integer(name: str, array) -> None:
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} should be an integer array, got dtype {array.dtype}")


def check_real(name: str, array) -> None:
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} should be an integer or floating-point array, got dtype {array.dtype}")


def check_boxes(boxes, name: str = "boxes") -> int:
    """``[N, 4]`` floating (x1, y1, x2, y2); returns N."""
    if boxes.ndim != 2:
        raise ValueError(f"{name} should be a 2d array [N, 4], got {boxes.ndim}d of shape {shape_of(boxes)}")
    if boxes.shape[1] != 4:
        raise ValueError(f"{name} should have 4 elements in dimension 1 (x1, y1, x2, y2), "
                         f"got shape {shape_of(boxes)}")
    check_floating(name, boxes)
    return int(boxes.shape[0])


def check_per_box(name: str, array, n: int, boxes_name: str = "boxes") -> None:
    """``[N]``: one value per box."""
    if array.ndim != 1:
        raise ValueError(f"{name} should be a 1d array [N], got {array.ndim}d of shape {shape_of(array)}")
    if array.shape[0] != n:
        raise ValueError(f"{boxes_name} and {name} should have the same number of elements in dimension 0, "
                         f"got {n} and {int(array.shape[0])}")


def check_nms_inputs(boxes, scores, idxs=None) -> int:
    """torchvision.ops.nms / batched_nms: boxes ``[N, 4]`` and scores ``[N]`` floating, idxs
    ``[N]`` integer; returns N."""
    n = check_boxes(boxes)
    check_per_box("scores", scores, n)
    check_floating("scores", scores)
    if idxs is not None:
        check_per_box("idxs", idxs, n)
        check_integer("idxs", idxs)
    return n


def check_proposals(proposals, post_nms_top_n: int) -> tuple[int, int]:
    """rpn output ``[B, K, 6]`` floating; returns (B, K)."""
    if proposals.ndim != 3 or proposals.shape[2] != 6:
        raise ValueError("proposals should be [B, K, 6] (x1, y1, x2, y2, objectness, level), "
                         f"got shape {shape_of(proposals)}")
    check_floating("proposals", proposals)
    if int(post_nms_top_n) < 1:
        raise ValueError(f"post_nms_top_n must be positive, got {post_nms_top_n}")
    return int(proposals.shape[0]), int(proposals.shape[1])


def check_sizes(name: str, sizes, b: int | None = None) -> int:
    """``[B, 2]`` (height, width) per image, integer or floating; returns B."""
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"{name} should be [B, 2] (height, width) per image, got shape {shape_of(sizes)}")
    if b is not None and sizes.shape[0] != b:
        raise ValueError(f"{name} should have one row per image, [{b}, 2], got shape {shape_of(sizes)}")
    check_real(name, sizes)
    return int(sizes.shape[0])


def check_strides(strides: Sequence[int]) -> tuple[int, int]:
    """One stride per pooled map, powers of two in non-decreasing order, e.g. (4, 8, 16, 32), (16, 32)
    or a dilated last stage's (4, 8, 16, 16); returns LevelMapper's (k_min, k_max): log2 of the
    first and of the last (torchvision ``_setup_scales``)."""
    strides = tuple(int(s) for s in strides)
    if (not strides or any(s < 1 or s & (s - 1) for s in strides)
            or any(a > b for a, b in zip(strides, strides[1:]))):
        raise ValueError(f"strides should be powers of two in non-decreasing order, one per map, "
                         f"e.g. (4, 8, 16, 32), got {strides}")
    return strides[0].bit_length() - 1, strides[-1].bit_length() - 1


def check_roi_align_inputs(features, rois, roi_img, image_sizes, strides, output_size: int, sampling_ratio: int,
                           num_rois=None, out=None) -> tuple[int, int, int]:
    """multilevel_roi_align: one ``[B, H, W, C]`` floating map per stride, rois ``[R, 4]``
    floating, roi_img ``[R]`` integer, image_sizes ``[B, 2]``, num_rois ``[1]`` integer, out
    ``[R, S, S, C]`` float32.  Returns (B, C, LevelMapper's (k_min, k_max))."""
    if not isinstance(features, (list, tuple)) or len(features) != len(strides):
        count = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(f"features should be a list of one map per stride {tuple(strides)}, got {count}")
    levels = check_strides(strides)
    b = c = None
    for i, f in enumerate(features):
        if f.ndim != 4 or (b is not None and (f.shape[0] != b or f.shape[3] != c)):
            like = "[B, H, W, C] (channels last)" if b is None else f"[{b}, H, W, {c}] like features[0]"
            raise ValueError(f"features[{i}] should be {like}, got shape {shape_of(f)}")
        check_floating(f"features[{i}]", f)
        b, c = int(f.shape[0]), int(f.shape[3])
    r = check_boxes(rois, "rois")
    check_per_box("roi_img", roi_img, r, "rois")
    check_integer("roi_img", roi_img)
    check_sizes("image_sizes", image_sizes, b)
    if int(sampling_ratio) <= 0:
        raise ValueError(f"sampling_ratio must be positive (adaptive sampling is not supported), got {sampling_ratio}")
    if int(output_size) <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    if num_rois is not None:
        if shape_of(num_rois) != (1,):
            raise ValueError(f"num_rois should be a [1] array, got shape {shape_of(num_rois)}")
        check_integer("num_rois", num_rois)
    if out is not None:
        expected = (r, int(output_size), int(output_size), c)
        if shape_of(out) != expected or out.dtype != np.float32:
            raise ValueError(f"out should be a float32 array of shape {expected}, got {out.dtype} {shape_of(out)}")
    return b, c, levels


def check_header_outputs(class_scores, class_boxes) -> tuple[int, int]:
    """class_scores ``[R, C]`` and class_boxes ``[R, C, 4]``, floating; returns (R, C)."""
    if class_scores.ndim != 2:
        raise ValueError(f"class_scores should be [R, C], got shape {shape_of(class_scores)}")
    r, c = shape_of(class_scores)
    if shape_of(class_boxes) != (r, c, 4):
        raise ValueError(f"class_boxes should be [R, C, 4] = [{r}, {c}, 4] like class_scores, "
                         f"got shape {shape_of(class_boxes)}")
    check_floating("class_scores", class_scores)
    check_floating("class_boxes", class_boxes)
    return r, c


def check_counts(counts: np.ndarray, rows: int) -> np.ndarray:
    """Host ``[B]`` RoIs per image that fit ``rows``; returns them as int64."""
    if counts.ndim != 1:
        raise ValueError(f"counts should be a 1d array [B], got shape {shape_of(counts)}")
    check_integer("counts", counts)
    counts = counts.astype(np.int64)
    if (counts < 0).any() or counts.sum() > rows:
        raise ValueError(f"counts {counts.tolist()} do not fit the {rows} rows of class_scores")
    return counts


def check_postprocess_inputs(class_scores, class_boxes, counts: np.ndarray, image_sizes, original_sizes) -> np.ndarray:
    """postprocess_detections: header outputs (:func:`check_header_outputs`), host ``counts [B]``
    that fit their rows, ``image_sizes`` and ``original_sizes [B, 2]``; returns counts as int64."""
    rows, _ = check_header_outputs(class_scores, class_boxes)
    counts = check_counts(counts, rows)
    b = check_sizes("image_sizes", image_sizes, counts.shape[0])
    check_sizes("original_sizes", original_sizes, b)
    return counts
