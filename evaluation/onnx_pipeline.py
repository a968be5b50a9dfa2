"""The whole detector without Triton: ONNX Runtime rpn -> NumPy roi step -> ONNX Runtime header ->
NumPy postprocess, through the same step interface the served models use
(:func:`python_backend.backends.get_backend`)."""
from __future__ import annotations

import numpy as np

from evaluation.parity import Detections, from_packed
from python_backend import names
from python_backend.backends import get_backend
from python_backend.onnx_session import open_session
from python_backend.reference.image import decode_image


class OnnxPipeline:
    """``rpn_path`` and ``header_path``: the exported ONNX networks; ``settings``: their DetectorSettings;
    ``threads``: ONNX Runtime's intra-op threads (python_backend/onnx_session.py)."""

    def __init__(self, rpn_path, header_path, settings, threads: int | None = None):
        self.rpn = open_session(rpn_path, threads)
        self.header = open_session(header_path, threads)
        self.settings = settings
        self.steps = get_backend("cpu")

    def __call__(self, images: list[np.ndarray], canvas: tuple[int, int] | None = None) -> list[Detections]:
        """Decoded ``[H, W, 3]`` uint8 images, served as one batch on ``canvas`` (default: the
        smallest of the settings' canvases that holds them all, as preprocess picks) -> their detections."""
        s, steps = self.settings, self.steps
        x, sizes, originals = steps.preprocess_batch(images, s, canvas)
        proposals, *features = self.rpn.run(None, {names.IMAGES: x, names.IMAGE_SIZES: sizes})
        batch = steps.roi_step(proposals, features, sizes, s)
        scores, boxes = self.header.run([names.CLASS_SCORES, names.CLASS_BOXES],
                                        {names.ROI_FEATURES: batch.features, names.ROIS: batch.rois})
        packed = steps.postprocess_batch(scores, boxes, batch.counts, sizes, originals, s)
        return [from_packed(*(part[i] for part in packed)) for i in range(len(images))]

    def from_bytes(self, payloads: list[bytes]) -> list[Detections]:
        """Encoded images, decoded as the served preprocess decodes them, then :meth:`__call__`."""
        s = self.settings
        return self([decode_image(p, s.max_input_pixels, s.min_input_side) for p in payloads])
