"""The NumPy operator set: the reference every fast path is tested against.

The same names and signatures as :mod:`python_backend.cuda.ops` (listed with their shapes in
:mod:`python_backend.backends`), on NumPy arrays.  ``preprocess_batch`` is the one exception to
"plain NumPy": its resize is torch's own CPU kernel (:mod:`python_backend.torch_image` says why);
:func:`python_backend.reference.image.preprocess_batch` stays the NumPy reference it is tested against.
"""
from .boxes import batched_nms, nms
from .detection import filter_proposals, postprocess_detections
from .roi_align import multilevel_roi_align


def preprocess_batch(*args, **kwargs):
    """:func:`python_backend.torch_image.preprocess_batch`, imported on the first call: torch is
    loaded by the step that resizes (preprocess) and not by every step on this operator set."""
    from ..torch_image import preprocess_batch as resize_batch

    return resize_batch(*args, **kwargs)


__all__ = ["nms", "batched_nms", "filter_proposals", "multilevel_roi_align", "postprocess_detections",
           "preprocess_batch"]
