"""Triton model: per-class NMS, score threshold, top-k, boxes back to original pixels.

Non-batching: one request holds its images' RoIs back to back, split by ``num_rois``.
With the model parameter ``device`` = "gpu" all images of a request go through one batched
CuPy call (:func:`python_backend.cuda.steps.postprocess_batch`); CuPy is imported only then.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.settings import DetectorSettings
from python_backend.steps import postprocess_step
from python_backend.triton_io import model_parameters, output, to_device_array, to_numpy

OUTPUTS = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        self.gpu = params.get("device", "cpu") == "gpu"
        if self.gpu:
            import cupy

            from python_backend.cuda import steps as cuda_steps

            self.cp = cupy
            self.gpu_postprocess = cuda_steps.postprocess_batch

    def execute(self, requests):
        if self.gpu:
            return self._execute_gpu(requests)
        responses = []
        for request in requests:
            get = lambda n: to_numpy(pb_utils.get_input_tensor_by_name(request, n))  # noqa: E731
            scores, boxes = get(names.CLASS_SCORES), get(names.CLASS_BOXES)
            counts = get(names.NUM_ROIS).reshape(-1)
            sizes, originals = get(names.IMAGE_SIZES), get(names.ORIGINAL_SIZES)
            starts = np.concatenate([[0], np.cumsum(counts)])
            per_image = [postprocess_step(scores[a:b], boxes[a:b], sizes[i], originals[i], self.settings)
                         for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
            stacked = [np.stack(parts) for parts in zip(*per_image)]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, n, a) for n, a in zip(
                    (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS),
                    stacked)]))
        return responses

    def _execute_gpu(self, requests):
        responses = []
        for request in requests:
            get = lambda n: self.cp.asarray(to_device_array(pb_utils.get_input_tensor_by_name(request, n)))  # noqa: E731
            # RoI counts size the launch, so they are read on the host
            counts = to_numpy(pb_utils.get_input_tensor_by_name(request, names.NUM_ROIS)).reshape(-1)
            outs = self.gpu_postprocess(get(names.CLASS_SCORES), get(names.CLASS_BOXES), counts,
                                        get(names.IMAGE_SIZES), get(names.ORIGINAL_SIZES), self.settings)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[output(pb_utils, n, a) for n, a in zip(OUTPUTS, outs)]))
        return responses
