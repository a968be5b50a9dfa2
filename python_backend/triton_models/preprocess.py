"""Triton model: decode (or take decoded) images, resize, normalize, pad onto the canvas.

Serves ``preprocess`` (encoded bytes) and ``preprocess_raw`` (uint8 HWC), by the model's name.
Each request's images are decoded and checked on their own (a bad image fails only its own
request); the good requests' images then go through the step backend's ``preprocess_batch`` as
one batch: NumPy on a CPU instance, CuPy on the instance's GPU (images are decoded on the CPU by
Pillow either way; the outputs stay on the GPU).
"""
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.reference.image import BadImageError, check_fits_canvas
from python_backend.triton_io import request_images
from python_backend.triton_models.adapter import BadRequest, StepAdapter, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = StepAdapter(args, pb_utils)
        self.raw = args["model_name"] == names.PREPROCESS_RAW

    def execute(self, requests):
        return self.adapter.execute(requests, self._run, read=self._images)

    def _images(self, request):
        """The request's decoded images, each checked to fit the canvas."""
        settings = self.adapter.settings
        try:
            images = request_images(pb_utils, request, self.raw, settings)
            for image in images:
                check_fits_canvas(*image.shape[:2], *settings.resized_size(*image.shape[:2]), settings)
        except BadImageError as e:
            raise BadRequest(f"bad input image: {e}") from None
        return images

    def _run(self, items):
        images = [image for item in items for image in item]
        outputs = self.adapter.backend.preprocess_batch(images, self.adapter.settings)
        return split(outputs, [len(item) for item in items])
