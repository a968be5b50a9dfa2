"""The CuPy operator set: the GPU fast path of :mod:`python_backend.reference.ops`.

The same names and signatures (listed with their shapes in :mod:`python_backend.backends`);
arrays come back as CuPy arrays on the current device, NumPy inputs are copied there.
"""
from .detection import postprocess_detections
from .image import preprocess_batch
from .nms import batched_nms, nms
from .proposals import filter_proposals
from .roi_align import multilevel_roi_align

__all__ = ["nms", "batched_nms", "filter_proposals", "multilevel_roi_align", "postprocess_detections",
           "preprocess_batch"]
