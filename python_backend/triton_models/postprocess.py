"""Triton model: per-class NMS, score threshold, top-k, boxes back to original pixels.

Non-batching: one request holds its images' RoIs back to back, split by ``num_rois``.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.settings import DetectorSettings
from python_backend.steps import postprocess_step
from python_backend.triton_io import model_parameters, output, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        self.settings = DetectorSettings.from_parameters(model_parameters(args))

    def execute(self, requests):
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
