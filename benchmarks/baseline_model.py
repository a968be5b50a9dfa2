"""Triton model (benchmark baseline): torchvision ``fasterrcnn_resnet50_fpn`` run eagerly on the GPU.

The reference the ensemble is measured against: same input as the ``fasterrcnn`` ensemble
(TYPE_STRING ``image``, one encoded image per batch item; or, when the config's input is
``image_raw``, as ``fasterrcnn_raw``: one decoded UINT8 HWC image), same outputs (``boxes [100, 4]``,
``scores [100]``, ``labels [100]`` int32, ``num_detections [1]`` int32, unused slots zero), same
weights (``weights_file``, a state_dict next to this file).  All images of a batch go through one
``model(list_of_images)`` call, as a user of torchvision would batch them.

Parameters (config.pbtxt): the DetectorSettings of the export (sizes, thresholds, detections per
image), ``weights_file``, and ``precision``: "fp32" (TF32 off) or "fp16" (``torch.autocast``
float16 around the model call, torchvision's usual mixed precision).
"""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from python_backend import names
from python_backend.reference.image import BadImageError
from python_backend.settings import DetectorSettings
from python_backend.triton_io import error_response, model_parameters, output, request_images


def pack(detections: list[dict], slots: int):
    """torchvision outputs -> fixed-slot ``boxes [B, slots, 4]``, ``scores``, ``labels`` int32, ``num [B, 1]``."""
    b = len(detections)
    boxes = np.zeros((b, slots, 4), np.float32)
    scores = np.zeros((b, slots), np.float32)
    labels = np.zeros((b, slots), np.int32)
    num = np.zeros((b, 1), np.int32)
    for i, det in enumerate(detections):
        n = min(slots, int(det["scores"].shape[0]))
        boxes[i, :n] = det["boxes"][:n].float().cpu().numpy()
        scores[i, :n] = det["scores"][:n].float().cpu().numpy()
        labels[i, :n] = det["labels"][:n].cpu().numpy()
        num[i, 0] = n
    return boxes, scores, labels, num


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.settings = s = DetectorSettings.from_parameters(params)
        self.precision = params.get("precision", "fp32")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {self.precision!r}")
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            # share the card with the ensemble's processes (see torch_runner.py)
            torch.cuda.set_per_process_memory_fraction(float(params.get("gpu_memory_fraction", "0.3")), self.device)
        else:  # KIND_CPU: only for trying the benchmark's plumbing on a machine without a GPU
            self.device = torch.device("cpu")
        model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=s.num_classes, min_size=s.min_size,
            max_size=s.max_size, image_mean=list(s.image_mean), image_std=list(s.image_std),
            rpn_pre_nms_top_n_test=s.rpn_pre_nms_top_n, rpn_post_nms_top_n_test=s.rpn_post_nms_top_n,
            rpn_nms_thresh=s.rpn_nms_thresh, rpn_score_thresh=s.rpn_score_thresh,
            box_score_thresh=s.box_score_thresh, box_nms_thresh=s.box_nms_thresh,
            box_detections_per_img=s.box_detections_per_img)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("weights_file", "weights.pt"))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model = model.to(self.device).eval()
        self.raw = json.loads(args["model_config"])["input"][0]["name"] == names.IMAGE_RAW

    def execute(self, requests):
        s = self.settings
        images, owners, errors = [], [], {}
        for k, request in enumerate(requests):
            try:
                decoded = request_images(pb_utils, request, self.raw, self.settings)
            except BadImageError as e:
                errors[k] = f"bad input image: {e}"
                continue
            for im in decoded:
                images.append(torch.from_numpy(im).to(self.device, non_blocking=True).permute(2, 0, 1).float() / 255)
                owners.append(k)
        detections = []
        if images:
            fp16 = self.precision == "fp16" and self.device.type == "cuda"
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                detections = self.model(images)
        packed = pack(detections, s.box_detections_per_img)
        owners = np.asarray(owners, dtype=np.int64)
        responses = []
        for k in range(len(requests)):
            if k in errors:
                responses.append(error_response(pb_utils, errors[k]))
                continue
            rows = np.flatnonzero(owners == k)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                output(pb_utils, n, a[rows]) for n, a in zip(
                    (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS),
                    packed)]))
        return responses
