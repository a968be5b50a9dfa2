"""Triton model: decode (or take decoded) images, resize, normalize, pad onto the canvas.

Thin adapter over python_backend.reference.image; serves ``preprocess`` (encoded bytes) and
``preprocess_raw`` (uint8 HWC) depending on the configured input.  A bad image fails only
its own request.

With the model parameter ``device`` = "gpu", images are still decoded on the CPU (Pillow), then
normalized, resized and padded on the GPU by :func:`python_backend.cuda.image.preprocess_batch`
(same results as the NumPy path to float32 rounding), and the outputs stay on the GPU as CuPy
arrays; CuPy is imported only then.
"""
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.reference.image import BadImageError, preprocess_batch
from python_backend.settings import DetectorSettings
from python_backend.triton_io import error_response, model_parameters, output, request_images


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        self.raw = args["model_name"] == names.PREPROCESS_RAW
        self.transform = preprocess_batch
        if params.get("device", "cpu") == "gpu":
            from python_backend.cuda.image import preprocess_batch as gpu_preprocess_batch

            import cupy

            cupy.cuda.Device(int(args["model_instance_device_id"])).use()
            self.transform = gpu_preprocess_batch

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images, sizes, originals = self.transform(
                    request_images(pb_utils, request, self.raw, self.settings), self.settings)
            except BadImageError as e:
                responses.append(error_response(pb_utils, f"bad input image: {e}"))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, names.IMAGES, images),
                output(pb_utils, names.IMAGE_SIZES, sizes),
                output(pb_utils, names.ORIGINAL_SIZES, originals),
            ]))
        return responses
