"""The GPU roi step's warm-up: compile its kernels and size CuPy's memory pool before serving."""
from __future__ import annotations

import cupy as cp

from ..settings import DetectorSettings, level_grid
from ..steps import roi_step
from . import ops


def warm_up_roi_step(settings: DetectorSettings, max_batch: int, features_dtype: str = "float32") -> None:
    """One roi step (:func:`python_backend.steps.roi_step` on the CuPy ops) on a full batch of
    ``max_batch`` images on the largest canvas (by area), at load.

    It compiles and loads every kernel before the first request, and leaves CuPy's memory pool
    holding the blocks of the largest batch.  Every buffer of the step is sized by the batch
    alone (RoI buffers for ``B * rpn_post_nms_top_n`` rows), and the inputs of a batch of
    several requests are joined into pool memory of the same sizes as here, so serving reuses
    these blocks.  Without it the pool grew in steps as ever larger batches first arrived
    (the soak run in docs/benchmarks.md).

    The proposals are all marked dropped (level -1): the buffers and launches are the same as
    for real ones, and no RoI survives.  ``features_dtype``: the maps' dtype as the rpn sends them
    (float16 from the torch target's fp16 rpn), so that the kernel variant served is the one compiled.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    # the feature maps of the largest canvas: a batch on any other canvas reads smaller inputs
    # (the RoI buffers do not depend on the canvas)
    h, w = settings.largest_canvas
    proposals = cp.zeros((max_batch, settings.num_proposals, 6), dtype=cp.float32)
    proposals[..., 5] = -1
    features = [cp.zeros((max_batch, level_grid(h, s), level_grid(w, s), settings.fpn_channels), dtype=features_dtype)
                for s in settings.roi_strides]
    sizes = cp.asarray([[h, w]] * max_batch, dtype=cp.float32)
    batch = roi_step(proposals, features, sizes, settings, ops)
    if int(batch.counts.sum()) != 0:
        raise RuntimeError("roi warm-up: dropped proposals produced RoIs")
