"""Detector settings: everything downstream of the networks needs, read from the torch model.

The exporter fills :class:`DetectorSettings` from a torchvision ``FasterRCNN`` object and
writes it into every model's ``config.pbtxt`` as ``parameters``; the Triton models read it
back with :meth:`DetectorSettings.from_parameters`.  Nothing downstream hard-codes a
threshold or a size.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Mapping

SIZE_DIVISIBLE = 32  # torchvision GeneralizedRCNNTransform.size_divisible
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5, the maps the RoI pooler reads
RPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6, the maps the RPN reads


@dataclass(frozen=True)
class DetectorSettings:
    """Settings of one exported Faster R-CNN. Sizes are (height, width) in pixels."""

    num_classes: int  # including background (torchvision label 0)
    canvas_height: int = 800
    canvas_width: int = 1344
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rpn_pre_nms_top_n: int = 1000  # eval value, per level
    rpn_post_nms_top_n: int = 1000  # eval value, per image
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_min_size: float = 1e-2  # torchvision RoIHeads.postprocess_detections
    fpn_channels: int = 256  # backbone.out_channels: channels of P2..P5 and of RoI features
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    # torchvision LevelMapper: canonical scale 224, canonical level 4, eps 1e-6
    canonical_scale: int = 224
    canonical_level: int = 4
    level_eps: float = 1e-6
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    max_input_pixels: int = 50_000_000  # decompression-bomb guard for encoded inputs
    min_input_side: int = 2
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        validate_canvas(self.canvas_height, self.canvas_width)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must count background plus at least one class, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, expected num_classes={self.num_classes} "
                "(index 0 is the background)"
            )

    @property
    def canvas(self) -> tuple[int, int]:
        return (self.canvas_height, self.canvas_width)

    @property
    def bbox_xform_clip(self) -> float:
        # torchvision BoxCoder default: log(1000 / 16)
        return math.log(1000.0 / 16)

    def to_parameters(self) -> dict[str, str]:
        """Flat string map for ``config.pbtxt`` ``parameters``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = json.dumps(list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_parameters(cls, params: Mapping[str, object]) -> "DetectorSettings":
        """Inverse of :meth:`to_parameters`. Accepts Triton's ``{"k": {"string_value": v}}`` form too."""
        kwargs = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key, raw in params.items():
            if key not in names:
                continue
            if isinstance(raw, Mapping):
                raw = raw["string_value"]
            value = json.loads(raw)
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"model config parameters lack {missing}")
        return cls(**kwargs)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size torchvision's GeneralizedRCNNTransform resizes an image of (height, width) to."""
        return resized_size(height, width, self.min_size, self.max_size)

    def rpn_level_topk(self) -> tuple[int, ...]:
        """Proposals kept per RPN level on the canvas (P2..P6), as the rpn network emits them."""
        ks = []
        for s in RPN_STRIDES:
            h, w = level_grid(self.canvas_height, s), level_grid(self.canvas_width, s)
            ks.append(min(self.rpn_pre_nms_top_n, h * w * 3))
        return tuple(ks)

    @property
    def num_proposals(self) -> int:
        return sum(self.rpn_level_topk())


def validate_canvas(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 64 or v % SIZE_DIVISIBLE:
            raise ValueError(
                f"canvas {name} must be a multiple of {SIZE_DIVISIBLE} and at least 64, got {v!r}"
            )


def level_grid(padded: int, stride: int) -> int:
    """Feature-map extent at ``stride`` for an input of ``padded`` pixels (a multiple of 32).

    P2..P5 divide exactly; P6 is LastLevelMaxPool (kernel 1, stride 2) over P5, so it rounds up.
    """
    if stride <= SIZE_DIVISIBLE:
        return padded // stride
    return -(-(padded // SIZE_DIVISIBLE) // (stride // SIZE_DIVISIBLE))


def padded_extent(size: int) -> int:
    """torchvision batch_images: round a resized side up to a multiple of 32."""
    return int(math.ceil(size / SIZE_DIVISIBLE) * SIZE_DIVISIBLE)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision ``_resize_image_and_masks`` in eager mode: the scale is a Python float and
    ``F.interpolate(recompute_scale_factor=True)`` floors ``side * scale``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def coco_class_names() -> tuple[str, ...]:
    """torchvision's 91 COCO category names (index 0 is background, 'N/A' marks unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return tuple(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])




# --- canvas buckets: smaller canvases the torch target's rpn is also traced at --------------------

BUCKET_ASPECTS = ((1, 1), (4, 3), (3, 4))  # (width, height) of the images the default buckets are for


def default_buckets(settings: DetectorSettings) -> tuple[tuple[int, int], ...]:
    """The padded resized size of a square, a 4:3 landscape and a 3:4 portrait image, each kept
    where it fits the canvas and is smaller than it; smallest first."""
    ch, cw = settings.canvas
    out = set()
    for aw, ah in BUCKET_ASPECTS:
        h, w = settings.resized_size(ah * 1000, aw * 1000)
        bucket = (padded_extent(h), padded_extent(w))
        if bucket[0] <= ch and bucket[1] <= cw and bucket != (ch, cw):
            out.add(bucket)
    return tuple(sorted(out, key=lambda b: (b[0] * b[1], b)))


def check_buckets(buckets, canvas: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``buckets`` as sorted (height, width) pairs; raises ValueError for one that is not a valid
    canvas, is not smaller than ``canvas`` or does not fit in it."""
    out = set()
    for b in buckets:
        h, w = (int(v) for v in b)
        validate_canvas(h, w)
        if h > canvas[0] or w > canvas[1] or (h, w) == tuple(canvas):
            raise ValueError(f"canvas bucket {h}x{w} must fit in the {canvas[0]}x{canvas[1]} canvas and be smaller")
        out.add((h, w))
    return tuple(sorted(out, key=lambda b: (b[0] * b[1], b)))


def format_buckets(buckets) -> str:
    """``((800, 1088), ...)`` -> ``"800x1088,..."`` (the rpn config's ``canvas_buckets`` parameter)."""
    return ",".join(f"{h}x{w}" for h, w in buckets)


def parse_buckets(text: str) -> tuple[tuple[int, int], ...]:
    """Inverse of :func:`format_buckets`; ``""`` is no bucket."""
    out = []
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"canvas bucket {item!r} is not HEIGHTxWIDTH") from None
        out.append((h, w))
    return tuple(out)


def bucket_file(height: int, width: int) -> str:
    """The rpn trace of one bucket, next to ``model.pt`` in the rpn's version folder."""
    return f"model_{height}x{width}.pt"
