"""Triton model (benchmark baseline): torchvision ``fasterrcnn_resnet50_fpn`` run eagerly, on the
instance's GPU (KIND_CPU only to try the benchmark's plumbing without one).

Thin adapter over :class:`evaluation.baseline.eager.EagerDetector`.  Same input as the
``fasterrcnn`` ensemble (TYPE_STRING ``image``, one encoded image per batch item) or, when the
config's input is ``image_raw``, as ``fasterrcnn_raw`` (one decoded UINT8 HWC image); same outputs
(``boxes``, ``scores``, ``labels``, ``num_detections``).  All images of the requests in one
``execute`` go through one model call.  A bad image fails only its own request.

Parameters (config.pbtxt): the export's DetectorSettings, ``weights_file`` (a state_dict next to
this file), ``precision`` ("fp32" with TF32 off, or "fp16" autocast) and ``gpu_memory_fraction``
(the share of the card this process may take, as the ensemble's torch runner does).
"""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from evaluation.baseline.eager import EagerDetector
from python_backend import names
from python_backend.reference.image import BadImageError
from python_backend.settings import DetectorSettings
from python_backend.triton_io import error_response, model_parameters, output, request_images

OUTPUTS = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(params)
        if args["model_instance_kind"] == "GPU":
            device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.cuda.set_per_process_memory_fraction(float(params.get("gpu_memory_fraction", "0.3")), device)
        else:
            device = torch.device("cpu")
        version = os.path.join(args["model_repository"], args["model_version"])
        weights = os.path.join(version, params.get("weights_file", "weights.pt"))
        self.detector = EagerDetector(self.settings, weights, params.get("precision", "fp32"), device)
        self.raw = json.loads(args["model_config"])["input"][0]["name"] == names.IMAGE_RAW

    def execute(self, requests):
        images, owners, errors = [], [], {}
        for k, request in enumerate(requests):
            try:
                decoded = request_images(pb_utils, request, self.raw, self.settings)
            except BadImageError as e:
                errors[k] = f"bad input image: {e}"
                continue
            images += decoded
            owners += [k] * len(decoded)
        packed = self.detector(images)
        owners = np.asarray(owners, dtype=np.int64)
        responses = []
        for k in range(len(requests)):
            if k in errors:
                responses.append(error_response(pb_utils, errors[k]))
                continue
            rows = np.flatnonzero(owners == k)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[output(pb_utils, n, a[rows]) for n, a in zip(OUTPUTS, packed)]))
        return responses
