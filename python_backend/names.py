"""Tensor and model names: the one contract shared by exporters, configs, models and client.

Every ONNX input/output, every ``config.pbtxt`` tensor and every ensemble tensor is
spelled here once.  Nothing else in the project writes these strings by hand.
"""

# --- Triton model names (folders of the model repository) -------------------------
ENSEMBLE = "fasterrcnn"
PREPROCESS = "preprocess"
RPN = "rpn"
ROI = "roi"
HEADER = "header"
POSTPROCESS = "postprocess"
STEPS = (PREPROCESS, RPN, ROI, HEADER, POSTPROCESS)

# --- ensemble inputs / outputs (what users send and receive) ------------------------
# [1, N] uint8 (dims [-1]): the N encoded bytes (JPEG, PNG, ...) of one image per request, as
# Triton's DALI examples take encoded images (dali_backend docs/examples/resnet50_trt,
# ensemble_dali_resnet50/config.pbtxt)
IMAGE_BYTES = "image"
DETECTION_BOXES = "boxes"  # [100, 4] float32, x1 y1 x2 y2 in original pixels
DETECTION_SCORES = "scores"  # [100] float32
DETECTION_LABELS = "labels"  # [100] int32, torchvision label ids (0 = background, never emitted)
NUM_DETECTIONS = "num_detections"  # [1] int32

# Second entry point for callers who decode images themselves: same outputs,
# input is an HWC uint8 RGB image.
ENSEMBLE_RAW = "fasterrcnn_raw"
IMAGE_RAW = "image_raw"  # [-1, -1, 3] uint8
PREPROCESS_RAW = "preprocess_raw"

# --- preprocess outputs / rpn inputs -------------------------------------------------
IMAGES = "images"  # [B, 3, H, W] float32, normalized, zero-padded onto one of the canvases (H, W)
IMAGE_SIZES = "image_sizes"  # [B, 2] float32: resized (height, width) of each image
ORIGINAL_SIZES = "original_sizes"  # [B, 2] float32: decoded (height, width)

# --- rpn outputs ------------------------------------------------------------------------
PROPOSALS = "proposals"  # [B, K, 6] float32: x1 y1 x2 y2 objectness_prob level(-1 = none)


def feature_names(count: int) -> tuple[str, ...]:
    """The rpn's outputs that the roi step pools, one per map of the box RoI pooler (in the
    backbone's output order): ``features_0`` ... ``[B, H/s, W/s, C]`` channels last.  How many
    and their strides are the model's (``DetectorSettings.roi_strides``)."""
    return tuple(f"features_{i}" for i in range(int(count)))


# fasterrcnn_resnet50_fpn's four (P2..P5); a model's own are DetectorSettings.feature_names
FEATURES = feature_names(4)

# --- roi step outputs / header inputs ----------------------------------------------
ROI_FEATURES = "roi_features"  # [R, 7, 7, 256] float32, channels last
ROIS = "rois"  # [R, 4] float32, x1 y1 x2 y2 on the resized image
NUM_ROIS = "num_rois"  # [B, 1] int32 (per image); R may hold one zero-area filler RoI

# --- header outputs -------------------------------------------------------------------
CLASS_SCORES = "class_scores"  # [R, C] float32 softmax, C includes background
CLASS_BOXES = "class_boxes"  # [R, C, 4] float32 decoded per class, not clipped

# Proposal row layout (last axis of PROPOSALS)
PROPOSAL_FIELDS = ("x1", "y1", "x2", "y2", "objectness", "level")
