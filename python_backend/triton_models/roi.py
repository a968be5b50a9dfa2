"""Triton model: proposal NMS per level, then multi-level ROIAlign.

Each request's images come back as ``rois [R, 4]`` and ``roi_features [R, 7, 7, 256]`` with
R = the request's surviving RoIs (R is the header's batch axis), plus ``num_rois [B, 1]``.
A request with no RoI at all gets one zero-area filler row so that the header is never
asked for an empty batch; ``num_rois`` tells postprocess to ignore it.

The requests of one ``execute`` run as one ``roi_step`` of the step backend: NumPy on a CPU
instance, CuPy on the instance's GPU (warmed up at load for the largest batch on the largest
canvas; arrays stay on the GPU).  The maps are on one canvas per batch (Triton's dynamic batcher
joins only requests of equal shapes), any of the settings' canvases.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.triton_models.adapter import StepAdapter, rows


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = StepAdapter(args, pb_utils)
        a = self.adapter
        maps = next(s.dtype for s in a.inputs if s.name == a.settings.feature_names[0])  # float16 from an fp16 torch rpn
        a.backend.warm_up(a.settings, max(a.max_batch, 1), features_dtype=maps)

    def execute(self, requests):
        return self.adapter.execute(requests, self._run)

    def _run(self, items):
        a = self.adapter
        sizes = a.join(items, names.IMAGE_SIZES)
        features = [a.join(items, f) for f in a.settings.feature_names]
        a.check_values({names.IMAGE_SIZES: sizes, **dict(zip(a.settings.feature_names, features))})
        batch = a.backend.roi_step(a.join(items, names.PROPOSALS), features, sizes, a.settings)
        return split_rois(batch, a.to_host(batch.counts), rows(items, names.IMAGE_SIZES), a.backend.xp)


def split_rois(batch, counts: np.ndarray, images: list, xp) -> list:
    """(rois, roi_features, num_rois) of each request, whose ``images`` are consecutive in ``batch``."""
    results, image, row = [], 0, 0
    for n in images:
        own = counts[image:image + n]
        total = int(own.sum())
        rois, feats = batch.rois[row:row + total], batch.features[row:row + total]
        if total == 0:  # the filler RoI
            rois = xp.zeros((1, 4), xp.float32)
            feats = xp.zeros((1,) + tuple(batch.features.shape[1:]), xp.float32)
        results.append((rois, feats, own.astype(np.int32).reshape(-1, 1)))
        image += n
        row += total
    return results
