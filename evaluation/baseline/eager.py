"""torchvision's ``fasterrcnn_resnet50_fpn`` run eagerly: the baseline that the served ensemble is
measured against, with the ensemble's settings, weights and output layout.  Knows nothing of Triton."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from python_backend.settings import DetectorSettings

PRECISIONS = ("fp32", "fp16")


def pack(detections: list[dict], slots: int):
    """torchvision outputs (one dict of ``boxes``, ``scores``, ``labels`` per image) -> the ensemble's
    layout: ``boxes [B, slots, 4]`` float32, ``scores [B, slots]`` float32, ``labels [B, slots]`` int32,
    ``num [B, 1]`` int32; detections past ``slots`` are dropped, unused slots are zero."""
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


class EagerDetector:
    """The model built from ``settings`` with the state_dict at ``weights``, on ``device``.

    ``precision``: "fp32", or "fp16" (``torch.autocast`` float16 around the model call, torchvision's
    usual mixed precision; on a CUDA device only, fp32 elsewhere).
    """

    def __init__(self, settings: DetectorSettings, weights: str | Path, precision: str, device: torch.device):
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        s = settings
        model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=s.num_classes, min_size=s.min_size,
            max_size=s.max_size, image_mean=list(s.image_mean), image_std=list(s.image_std),
            rpn_pre_nms_top_n_test=s.rpn_pre_nms_top_n, rpn_post_nms_top_n_test=s.rpn_post_nms_top_n,
            rpn_nms_thresh=s.rpn_nms_thresh, rpn_score_thresh=s.rpn_score_thresh,
            box_score_thresh=s.box_score_thresh, box_nms_thresh=s.box_nms_thresh,
            box_detections_per_img=s.box_detections_per_img)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.to(device).eval()
        self.settings, self.device = settings, device
        self.fp16 = precision == "fp16" and device.type == "cuda"

    def __call__(self, images: list[np.ndarray]):
        """Decoded ``[H, W, 3]`` uint8 images, in one ``model(list_of_images)`` call as a user of
        torchvision would batch them -> :func:`pack`'s arrays for the batch."""
        if not images:
            return pack([], self.settings.box_detections_per_img)
        xs = [torch.from_numpy(im).to(self.device, non_blocking=True).permute(2, 0, 1).float() / 255 for im in images]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            detections = self.model(xs)
        return pack(detections, self.settings.box_detections_per_img)
