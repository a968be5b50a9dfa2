"""Triton model (benchmark baseline): torchvision ``fasterrcnn_resnet50_fpn`` run eagerly, on the
instance's GPU (KIND_CPU only to try the benchmark's plumbing without one).

Thin adapter over :class:`evaluation.baseline.eager.EagerDetector` through the project's one
adapter (:class:`python_backend.triton_models.adapter.StepAdapter`: the instance's device, per-request
errors).  Same input as the ``fasterrcnn`` ensemble (UINT8 ``image``, the encoded bytes of one image
per request) or, when the config's input is ``image_raw``, as ``fasterrcnn_raw`` (one decoded UINT8
HWC image); same outputs (``boxes``, ``scores``, ``labels``, ``num_detections``).  The images of all
good requests of one ``execute`` go through one model call.  A bad image fails only its own request.

Parameters (config.pbtxt): the export's DetectorSettings, ``weights_file`` (a state_dict next to
this file), ``precision`` ("fp32" with TF32 off, or "fp16" autocast) and ``gpu_memory_gib``
(the caching allocator's cap, as the ensemble's torch runner has: evaluation/repositories.py).
"""
import os

import torch
import triton_python_backend_utils as pb_utils

from evaluation.baseline.eager import EagerDetector
from python_backend import names
from python_backend.reference.image import BadImageError
from python_backend.triton_io import request_images
from python_backend.triton_models.adapter import BadRequest, StepAdapter, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = adapter = StepAdapter(args, pb_utils, arrays="torch")
        device = adapter.arrays.device  # the adapter made it current, TF32 off, the allocator capped
        version = os.path.join(args["model_repository"], args["model_version"])
        weights = os.path.join(version, adapter.params.get("weights_file", "weights.pt"))
        self.detector = EagerDetector(adapter.settings, weights, adapter.params.get("precision", "fp32"), device)
        self.raw = adapter.config["input"][0]["name"] == names.IMAGE_RAW

    def execute(self, requests):
        return self.adapter.execute(requests, self._run, read=self._images)

    def _images(self, request):
        try:
            return request_images(pb_utils, request, self.raw, self.adapter.settings)
        except BadImageError as e:
            raise BadRequest(f"bad input image: {e}") from None

    def _run(self, items):
        packed = self.detector([image for item in items for image in item])
        return split([torch.from_numpy(a) for a in packed], [len(item) for item in items])
