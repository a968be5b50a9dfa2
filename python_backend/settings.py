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

from . import names

# fasterrcnn_resnet50_fpn's geometry: the defaults of DetectorSettings only.  An exported model's
# own are measured from it (exporters/structure.py) and recorded in its settings: size_divisible,
# rpn_strides, roi_strides.
SIZE_DIVISIBLE = 32  # torchvision GeneralizedRCNNTransform.size_divisible
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5, the maps the RoI pooler reads
RPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6, the maps the RPN reads


@dataclass(frozen=True)
class DetectorSettings:
    """Settings of one exported Faster R-CNN. Sizes are (height, width) in pixels."""

    num_classes: int  # including background (torchvision label 0)
    # (height, width) pairs the rpn runs on, multiples of 32, sorted by area; "auto" (or empty):
    # :func:`default_canvases` of min_size / max_size
    canvases: tuple[tuple[int, int], ...] | str = "auto"
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rpn_pre_nms_top_n: int = 1000  # eval value, per level
    rpn_post_nms_top_n: int = 1000  # eval value, per image
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    # AnchorGenerator.num_anchors_per_location(): torchvision's default is 3 aspect ratios x 1 size
    rpn_anchors_per_cell: int = 3
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
    # torchvision resizes any image whose resized sides are both >= 1 (a 1x16 image: 83x1333)
    min_input_side: int = 1
    class_names: tuple[str, ...] = field(default=())
    # --- structure, read from the model (exporters/structure.py) ------------------------
    size_divisible: int = SIZE_DIVISIBLE  # transform.size_divisible: padding of each image
    # stride of each map the RPN reads, in the backbone's output order (measured by a probe pass)
    rpn_strides: tuple[int, ...] = RPN_STRIDES
    # AnchorGenerator sizes and aspect ratios, one tuple per RPN map
    rpn_anchor_sizes: tuple[tuple[float, ...], ...] = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    rpn_aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5
    rpn_head_convs: int = 1  # RPNHead conv_depth (v2: 2, each conv + norm + ReLU)
    # the box RoI pooler's maps (MultiScaleRoIAlign featmap_names present in the backbone's output,
    # in that output's order, as its _filter_input keeps them) and their strides
    roi_featmap_names: tuple[str, ...] = ("0", "1", "2", "3")
    roi_strides: tuple[int, ...] = FPN_STRIDES
    box_head: str = "TwoMLPHead"  # or FastRCNNConvFCHead (v2)

    def __post_init__(self) -> None:
        canvases = self.canvases
        if canvases in ("auto", (), None):
            canvases = default_canvases(self.min_size, self.max_size, self.size_divisible)
        object.__setattr__(self, "canvases", check_canvases(canvases, self.size_divisible))
        if len(self.roi_featmap_names) != len(self.roi_strides) or not self.roi_strides:
            raise ValueError(f"roi_featmap_names {self.roi_featmap_names} and roi_strides {self.roi_strides} "
                             "should name one stride per pooled map, at least one")
        for what, strides in (("rpn_strides", self.rpn_strides), ("roi_strides", self.roi_strides)):
            if not strides or any(s < 1 or s & (s - 1) for s in strides):
                raise ValueError(f"{what} should be powers of two, got {strides}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must count background plus at least one class, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries, expected num_classes={self.num_classes} "
                "(index 0 is the background)"
            )

    @property
    def largest_canvas(self) -> tuple[int, int]:
        """The canvas of the largest area (the last of the sorted ``canvases``): what memory is
        sized for at load (warm-ups, the roi step's buffers)."""
        return self.canvases[-1]

    def canvas_for(self, height: int, width: int) -> tuple[int, int] | None:
        """The smallest canvas (by area, then the sorted order) holding ``height x width`` padded
        pixels, or None when none does."""
        return next(((h, w) for h, w in self.canvases if height <= h and width <= w), None)

    @property
    def bbox_xform_clip(self) -> float:
        # torchvision BoxCoder default: log(1000 / 16)
        return math.log(1000.0 / 16)

    def to_parameters(self) -> dict[str, str]:
        """Flat string map for ``config.pbtxt`` ``parameters``."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = json.dumps(_lists(getattr(self, f.name)))
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
            kwargs[key] = _tuples(json.loads(raw))
        missing = [n for n, f in names.items() if n not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"model config parameters lack {missing}")
        return cls(**kwargs)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size torchvision's GeneralizedRCNNTransform resizes an image of (height, width) to."""
        return resized_size(height, width, self.min_size, self.max_size)

    def rpn_level_topk(self) -> tuple[int, ...]:
        """Proposals the rpn network emits per level (P2..P6): torchvision's pre-NMS top-n, or all
        the level's anchors where a canvas has fewer, for the canvas with the most.  One constant
        for every canvas (TensorRT's TopK takes a constant K, and every canvas's outputs have one
        shape); on a smaller canvas the level's surplus rows are padding (level -1)."""
        ks = []
        for s in self.rpn_strides:
            anchors = max(level_grid(h, s) * level_grid(w, s) * self.rpn_anchors_per_cell for h, w in self.canvases)
            ks.append(min(self.rpn_pre_nms_top_n, anchors))
        return tuple(ks)

    @property
    def num_proposals(self) -> int:
        return sum(self.rpn_level_topk())

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The rpn's pooled-map outputs (the roi step's inputs), one per ``roi_strides``."""
        return names.feature_names(len(self.roi_strides))

    @property
    def level_range(self) -> tuple[int, int]:
        """torchvision MultiScaleRoIAlign's LevelMapper (k_min, k_max): log2 of the first and the
        last pooled map's stride (``_setup_scales``: -log2 of scales[0] and scales[-1])."""
        return int(self.roi_strides[0]).bit_length() - 1, int(self.roi_strides[-1]).bit_length() - 1


def validate_canvas(height: int, width: int, size_divisible: int = SIZE_DIVISIBLE) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 64 or v % size_divisible:
            raise ValueError(
                f"canvas {name} must be a multiple of {size_divisible} and at least 64, got {v!r}"
            )


def check_canvases(canvases, size_divisible: int = SIZE_DIVISIBLE) -> tuple[tuple[int, int], ...]:
    """``canvases`` as distinct (height, width) pairs sorted by area, then height; raises
    ValueError for an empty list or a canvas that is not a multiple of 32 of at least 64."""
    out = set()
    for c in canvases:
        try:
            h, w = c
        except (TypeError, ValueError):
            raise ValueError(f"a canvas must be a (height, width) pair, got {c!r}") from None
        validate_canvas(h, w, size_divisible)
        out.add((h, w))
    if not out:
        raise ValueError("expected at least one canvas, got none")
    return tuple(sorted(out, key=lambda c: (c[0] * c[1], c)))


def level_grid(padded: int, stride: int) -> int:
    """Feature-map extent at ``stride`` (a power of two) for an input of ``padded`` pixels (a
    multiple of size_divisible): ``ceil(padded / stride)``.

    Maps up to size_divisible divide exactly; each stride-2 step rounds up (a 3x3 conv with
    padding 1, a 1x1 conv, LastLevelMaxPool's kernel 1), so P6 of a 800-pixel side has 13 cells.
    """
    return -(-int(padded) // int(stride))


def padded_extent(size: int, size_divisible: int = SIZE_DIVISIBLE) -> int:
    """torchvision batch_images: round a resized side up to a multiple of ``size_divisible``."""
    return int(math.ceil(size / size_divisible) * size_divisible)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision ``_resize_image_and_masks`` in eager mode: the scale is a Python float and
    ``F.interpolate(recompute_scale_factor=True)`` floors ``side * scale``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def coco_class_names() -> tuple[str, ...]:
    """torchvision's 91 COCO category names (index 0 is background, 'N/A' marks unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return tuple(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])




# --- the default canvases ------------------------------------------------------------------

# (width, height) of the images whose padded resized size is a canvas of its own, besides the
# full landscape and portrait ones: square photos and the 4:3 / 3:4 of most cameras
CANVAS_ASPECTS = ((1, 1), (4, 3), (3, 4))


def default_canvases(min_size: int, max_size: int, size_divisible: int = SIZE_DIVISIBLE) -> tuple[tuple[int, int], ...]:
    """The canvases of ``canvases="auto"``, sorted by area.

    The full landscape canvas (padded min_size x padded max_size) and the portrait one (its
    transpose) hold every image torchvision takes: its resize leaves the short side at most
    min_size and the long side at most max_size.  The padded resized sizes of a square, a 4:3
    and a 3:4 image are canvases too, so those common shapes pay for no padding beyond
    torchvision's own.  For 800/1333: 800x800, 800x1088, 1088x800, 800x1344, 1344x800.
    """
    short, long = padded_extent(min_size, size_divisible), padded_extent(max_size, size_divisible)
    out = {(short, long), (long, short)}
    for aw, ah in CANVAS_ASPECTS:
        h, w = resized_size(ah * 1000, aw * 1000, min_size, max_size)
        out.add((padded_extent(h, size_divisible), padded_extent(w, size_divisible)))
    return check_canvases(out, size_divisible)


def format_canvases(canvases) -> str:
    """``((800, 1088), (1344, 800))`` -> ``"800x1088,1344x800"`` (height x width, as ``--canvases`` takes them)."""
    return ",".join(f"{h}x{w}" for h, w in canvases)


def parse_canvases(text: str) -> tuple[tuple[int, int], ...]:
    """Inverse of :func:`format_canvases` (checked and sorted by :func:`check_canvases`)."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"canvas {item!r} is not HEIGHTxWIDTH such as 800x1344") from None
        out.append((h, w))
    return check_canvases(out)


def canvas_file(height: int, width: int, unmasked: bool = False) -> str:
    """The torch target's rpn trace at one canvas, in the rpn's version folder (``unmasked``: the
    trace without extent masks, for batches that fill the canvas)."""
    return f"model_{height}x{width}{'_unmasked' if unmasked else ''}.pt"


def fills_canvas(image_sizes, canvas: tuple[int, int], size_divisible: int = SIZE_DIVISIBLE) -> bool:
    """Whether every image's padded extent (its resized ``(h, w)`` rounded up to
    ``SIZE_DIVISIBLE``, as the rpn's extent masks compute it in float32) is the whole ``canvas``:
    then every extent mask is all ones and the rpn without masks gives the same bits."""
    import numpy as np

    sizes = np.asarray(image_sizes, dtype=np.float32).reshape(-1, 2)
    padded = np.ceil(sizes / np.float32(size_divisible)) * np.float32(size_divisible)
    return bool(sizes.shape[0] > 0 and (padded == np.asarray(canvas, np.float32)).all())


def _lists(value):
    """Tuples (nested too) as lists, for JSON."""
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    """JSON lists (nested too) as tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def parse_flag(value) -> bool:
    """A yes/no setting as model-config parameters, flags and environment variables write it:
    ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (any case; empty is false) or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {value!r}")
