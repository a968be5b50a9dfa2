"""Triton model: per-class NMS, score threshold, top-k, boxes back to original pixels.

Non-batching: one request holds its images' RoIs back to back, split by ``num_rois``.
With the model parameter ``device`` = "gpu" the request goes through one batched CuPy call
(:func:`python_backend.cuda.steps.postprocess_batch`) on tensors that stay on the GPU; CuPy is
imported only then.  Otherwise :func:`python_backend.steps.postprocess_batch` (NumPy).
"""
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend import steps as cpu_steps
from python_backend.settings import DetectorSettings
from python_backend.triton_io import model_parameters, output, to_device_array, to_numpy

OUTPUTS = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        if params.get("device", "cpu") == "gpu":
            import cupy

            from python_backend.cuda import steps as gpu_steps

            self.read = lambda t: cupy.asarray(to_device_array(t))
            self.postprocess = gpu_steps.postprocess_batch
        else:
            self.read = to_numpy
            self.postprocess = cpu_steps.postprocess_batch

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda n: self.read(pb_utils.get_input_tensor_by_name(request, n))  # noqa: E731
            # RoI counts size the work per image, so they are read on the host
            counts = to_numpy(pb_utils.get_input_tensor_by_name(request, names.NUM_ROIS)).reshape(-1)
            outs = self.postprocess(get(names.CLASS_SCORES), get(names.CLASS_BOXES), counts,
                                    get(names.IMAGE_SIZES), get(names.ORIGINAL_SIZES), self.settings)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[output(pb_utils, n, a) for n, a in zip(OUTPUTS, outs)]))
        return responses
