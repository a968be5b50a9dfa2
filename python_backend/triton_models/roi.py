"""Triton model: proposal NMS per level, then multi-level ROIAlign.

Each request's images come back as ``rois [R, 4]`` and ``roi_features [R, 256, 7, 7]`` with
R = the request's surviving RoIs (R is the header's batch axis), plus ``num_rois [B, 1]``.
A request with no RoI at all gets one zero-area filler row so that the header is never
asked for an empty batch; ``num_rois`` tells postprocess to ignore it.

With the model parameter ``device`` = "gpu" the step runs :mod:`python_backend.cuda` on CuPy
arrays that stay on the GPU (inputs through DLPack, outputs through ``Tensor.from_dlpack``);
CuPy is imported only then.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend.settings import DetectorSettings
from python_backend.steps import roi_step
from python_backend.triton_io import model_parameters, output, to_device_array, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        self.gpu = params.get("device", "cpu") == "gpu"
        if self.gpu:
            import cupy

            from python_backend.cuda import steps as cuda_steps

            self.cp = cupy
            self.gpu_roi_step = cuda_steps.roi_step

    def execute(self, requests):
        if self.gpu:
            return self._execute_gpu(requests)
        get = lambda r, n: to_numpy(pb_utils.get_input_tensor_by_name(r, n))  # noqa: E731
        per_request = [r_in.shape[0] for r_in in (get(r, names.IMAGE_SIZES) for r in requests)]
        proposals = np.concatenate([get(r, names.PROPOSALS) for r in requests])
        features = [np.concatenate([get(r, f) for r in requests]) for f in names.FEATURES]
        sizes = np.concatenate([get(r, names.IMAGE_SIZES) for r in requests])
        batch = roi_step(proposals, features, sizes, self.settings)
        responses, img, row = [], 0, 0
        for n in per_request:
            counts = batch.counts[img:img + n]
            total = int(counts.sum())
            rois = batch.rois[row:row + total]
            feats = batch.features[row:row + total]
            if total == 0:
                rois = np.zeros((1, 4), np.float32)
                feats = np.zeros((1,) + batch.features.shape[1:], np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, names.ROIS, rois),
                output(pb_utils, names.ROI_FEATURES, feats),
                output(pb_utils, names.NUM_ROIS, counts.astype(np.int32).reshape(-1, 1)),
            ]))
            img += n
            row += total
        return responses

    def _execute_gpu(self, requests):
        cp = self.cp
        get = lambda r, n: cp.asarray(to_device_array(pb_utils.get_input_tensor_by_name(r, n)))  # noqa: E731
        join = lambda arrays: arrays[0] if len(arrays) == 1 else cp.concatenate(arrays)  # noqa: E731
        sizes = [get(r, names.IMAGE_SIZES) for r in requests]
        per_request = [s.shape[0] for s in sizes]
        proposals = join([get(r, names.PROPOSALS) for r in requests])
        features = [join([get(r, f) for r in requests]) for f in names.FEATURES]
        batch = self.gpu_roi_step(proposals, features, join(sizes), self.settings)
        counts_host = cp.asnumpy(batch.counts)
        responses, img, row = [], 0, 0
        for n in per_request:
            counts = counts_host[img:img + n]
            total = int(counts.sum())
            rois = batch.rois[row:row + total]
            feats = batch.features[row:row + total]
            if total == 0:
                rois = cp.zeros((1, 4), cp.float32)
                feats = cp.zeros((1,) + batch.features.shape[1:], cp.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, names.ROIS, rois),
                output(pb_utils, names.ROI_FEATURES, feats),
                output(pb_utils, names.NUM_ROIS, counts.astype(np.int32).reshape(-1, 1)),
            ]))
            img += n
            row += total
        return responses
