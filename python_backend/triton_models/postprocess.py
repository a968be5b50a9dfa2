"""Triton model: per-class NMS, score threshold, top-k, boxes back to original pixels.

Non-batching: a request holds its images' RoIs back to back, split by ``num_rois`` (a request
with no RoI carries the roi step's one filler row, which is dropped here).  Each request's
tensors are checked to agree with each other; the requests of one ``execute`` then run as one
``postprocess_batch`` of the step backend (NumPy, or CuPy on the instance's GPU).
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.triton_models.adapter import StepAdapter, check_counts, rows, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = StepAdapter(args, pb_utils)

    def execute(self, requests):
        return self.adapter.execute(requests, self._run, read=self._read)

    def _read(self, request):
        item = self.adapter.read(request)
        counts = self.adapter.to_host(item[names.NUM_ROIS]).reshape(-1).astype(np.int64)
        check_counts(counts, {n: int(item[n].shape[0]) for n in self.adapter.input_names})
        # the roi step's filler row of an image-less batch is not a RoI
        item[names.CLASS_SCORES] = item[names.CLASS_SCORES][:int(counts.sum())]
        item[names.CLASS_BOXES] = item[names.CLASS_BOXES][:int(counts.sum())]
        item["counts"] = counts
        return item

    def _run(self, items):
        a = self.adapter
        outputs = a.backend.postprocess_batch(
            a.join(items, names.CLASS_SCORES), a.join(items, names.CLASS_BOXES),
            np.concatenate([item["counts"] for item in items]), a.join(items, names.IMAGE_SIZES),
            a.join(items, names.ORIGINAL_SIZES), a.settings)
        return split(outputs, rows(items, names.NUM_ROIS))

