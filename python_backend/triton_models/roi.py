"""Triton model: proposal NMS per level, then multi-level ROIAlign.

Each request's images come back as ``rois [R, 4]`` and ``roi_features [R, 7, 7, 256]`` with
R = the request's surviving RoIs (R is the header's batch axis), plus ``num_rois [B, 1]``.
A request with no RoI at all gets one zero-area filler row so that the header is never
asked for an empty batch; ``num_rois`` tells postprocess to ignore it.

With the model parameter ``device`` = "gpu" the step runs :mod:`python_backend.cuda` on CuPy
arrays that stay on the GPU (inputs through DLPack, outputs through ``Tensor.from_dlpack``);
CuPy is imported only then.  Otherwise :func:`python_backend.steps.roi_step` (NumPy).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend import names
from python_backend import steps as cpu_steps
from python_backend.settings import DetectorSettings
from python_backend.triton_io import model_parameters, output, to_device_array, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        if params.get("device", "cpu") == "gpu":
            import cupy

            from python_backend.cuda import steps as gpu_steps

            self.xp = cupy
            self.read = lambda t: cupy.asarray(to_device_array(t))
            self.roi_step = gpu_steps.roi_step
            max_batch = int(json.loads(args["model_config"]).get("max_batch_size", 0))
            gpu_steps.warm_up_roi_step(self.settings, max(max_batch, 1))
        else:
            self.xp = np
            self.read = to_numpy
            self.roi_step = cpu_steps.roi_step

    def execute(self, requests):
        xp = self.xp
        get = lambda r, n: self.read(pb_utils.get_input_tensor_by_name(r, n))  # noqa: E731
        join = lambda arrays: arrays[0] if len(arrays) == 1 else xp.concatenate(arrays)  # noqa: E731
        sizes = [get(r, names.IMAGE_SIZES) for r in requests]
        proposals = join([get(r, names.PROPOSALS) for r in requests])
        features = [join([get(r, f) for r in requests]) for f in names.FEATURES]
        batch = self.roi_step(proposals, features, join(sizes), self.settings)
        counts_host = np.asarray(batch.counts.get() if xp is not np else batch.counts)
        responses, img, row = [], 0, 0
        for n in (s.shape[0] for s in sizes):
            counts = counts_host[img:img + n]
            total = int(counts.sum())
            rois = batch.rois[row:row + total]
            feats = batch.features[row:row + total]
            if total == 0:
                rois = xp.zeros((1, 4), xp.float32)
                feats = xp.zeros((1,) + batch.features.shape[1:], xp.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, names.ROIS, rois),
                output(pb_utils, names.ROI_FEATURES, feats),
                output(pb_utils, names.NUM_ROIS, counts.astype(np.int32).reshape(-1, 1)),
            ]))
            img += n
            row += total
        return responses
