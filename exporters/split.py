"""Faster R-CNN split into the two dense networks that TensorRT can take.

``RpnNetwork``: backbone + FPN + RPN head, anchors decoded, top-k per level, on any canvas.
``HeaderNetwork``: box head + predictor + box decode over a dynamic number of RoIs.

Why the canvas needs care: torchvision pads each batch only to the largest image rounded up
to 32, so an image served alone sees zeros (conv padding) right after its own padded extent.
On a larger canvas it would see activations of the padding instead, and its results would
depend on the canvas and the batch.  ``RpnNetwork`` therefore zeroes every activation outside
the image's own padded extent before each spatial conv or pool, and anchors outside that
extent are kept out of top-k.  With that, an image's proposals and FPN maps (inside its
extent) are the ones torchvision computes for that image alone.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from python_backend.settings import DetectorSettings

from .structure import backbone_maps, check_maskable, is_global_pool


def _size(t: Tensor, dim: int):
    """``t.shape[dim]``: symbolic in an ONNX export (whose height and width may be dynamic), a plain
    int otherwise.  A TorchScript trace is made per canvas, and a traced size arithmetic there
    becomes NumToTensor -> mul -> Int, a host read that breaks CUDA-graph capture
    (tests/test_torch_target.py::test_rpn_trace_has_no_host_synchronization)."""
    return t.shape[dim] if torch.onnx.is_in_onnx_export() else int(t.shape[dim])


class _ExtentMasks:
    """Per-forward cache of {map stride: [B, 1, h, w] float mask}.

    Works on any canvas: a map's stride is an architecture constant (read once from the shapes
    the network first sees, a power of two), while the map's size and each image's valid extent
    are tensors of this call, so a trace exported with dynamic height and width stays exact on
    every canvas.
    """

    def __init__(self):
        self.images: Tensor | None = None
        self.padded: Tensor | None = None  # [B, 2] float: each image's padded (h, w)
        self.cache: dict[tuple[int, int], Tensor] = {}

    def reset(self, images: Tensor, image_sizes: Tensor, size_divisible: int) -> None:
        self.images = images
        self.padded = torch.ceil(image_sizes / size_divisible) * size_divisible
        self.cache = {}

    def stride(self, x: Tensor) -> tuple[int, int]:
        """(sy, sx) of a map against the input images: powers of two (P6 rounds its size up)."""
        assert self.images is not None
        ih, iw = int(self.images.shape[-2]), int(self.images.shape[-1])
        return (2 ** round(math.log2(ih / int(x.shape[-2]))), 2 ** round(math.log2(iw / int(x.shape[-1]))))

    def valid_extent(self, stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Each image's valid rows and columns on a map of ``stride``: ceil(padded / stride) cells,
        exact up to size_divisible and each stride-2 step's round-up beyond (LastLevelMaxPool's P6)."""
        assert self.padded is not None
        return torch.ceil(self.padded[:, 0] / stride[0]), torch.ceil(self.padded[:, 1] / stride[1])

    def cells(self, x: Tensor, stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """([B, h] rows, [B, w] columns) bool: which cells of map ``x`` lie inside each image's extent."""
        vh, vw = self.valid_extent(stride)
        rows = torch.arange(_size(x, -2), device=vh.device).to(torch.float32)[None, :] < vh[:, None]
        cols = torch.arange(_size(x, -1), device=vw.device).to(torch.float32)[None, :] < vw[:, None]
        return rows, cols

    def mask(self, x: Tensor) -> Tensor:
        stride = self.stride(x)
        if stride not in self.cache:
            rows, cols = self.cells(x, stride)
            self.cache[stride] = (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)
        return self.cache[stride]


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode batch norm into the convolution before it, in place; returns how many.

    torchvision's ResNet pairs ``convN`` with ``bnN`` in a block (and the stem), and ``downsample``
    is ``Sequential(conv, bn)``.  Pretrained backbones use ``FrozenBatchNorm2d``, backbones built
    without weights ``BatchNorm2d``; both hold running statistics, an affine and ``eps``.  The
    fused convolution computes ``bn(conv(x))`` with the normalization in its weights and bias
    (what TensorRT does by itself) and the graph has 53 fewer nodes.  For the torch target it is
    not a speed-up at batch 8 (torch adds a cuDNN convolution's bias in a separate pass, which
    costs what the batch norm did; docs/benchmarks.md has the measurement); at batch 1 it saves
    launches.
    Uses ``torch.nn.utils.fusion.fuse_conv_bn_weights``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    from torchvision.ops.misc import FrozenBatchNorm2d

    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)

    def fold(conv: nn.Conv2d, bn: nn.Module) -> None:
        if isinstance(bn, nn.BatchNorm2d) and bn.training:
            raise ValueError("fold_batch_norms needs eval-mode batch norms")
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias

    count = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        pairs = []
        if isinstance(parent, nn.Sequential):
            items = list(children.items())
            pairs = [(a, b) for (a, m), (b, n) in zip(items, items[1:])
                     if isinstance(m, nn.Conv2d) and isinstance(n, norms)]
        pairs += [(f"conv{k[2:]}", k) for k, m in children.items()
                  if k.startswith("bn") and isinstance(m, norms) and isinstance(children.get(f"conv{k[2:]}"), nn.Conv2d)]
        for conv_name, bn_name in pairs:
            fold(children[conv_name], children[bn_name])
            setattr(parent, bn_name, nn.Identity())
            count += 1
    return count


class _MaskedGlobalAvgPool(nn.Module):
    """AdaptiveAvgPool2d(1) over each image's extent only: the mean torchvision takes over the
    image's own map (MobileNetV3's SqueezeExcitation), whatever the canvas holds beyond it."""

    def __init__(self, masks: _ExtentMasks):
        super().__init__()
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        m = self.masks.mask(x)
        return (x * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True)


def _mask_spatial_inputs(module: nn.Module, masks: _ExtentMasks) -> int:
    """Zero the input outside each image's extent for every conv wider than 1x1 and every max pool,
    and make every global average pool average over the extent only.  ``module`` must pass
    :func:`exporters.structure.check_maskable` (nothing else mixes cells)."""
    count = 0

    def hook(_mod, args):
        x = args[0]
        return (x * masks.mask(x),) + tuple(args[1:])

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_global_pool(child):
                setattr(parent, name, _MaskedGlobalAvgPool(masks))
                count += 1
    for m in module.modules():
        spatial_conv = isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)
        if spatial_conv or isinstance(m, nn.MaxPool2d):
            m.register_forward_pre_hook(hook)
            count += 1
    return count


class RpnNetwork(nn.Module):
    """Backbone + FPN + RPN head with anchors decoded and top-k per level, on any canvas.

    The network has no canvas of its own: height and width are free (a multiple of 32), so one
    ONNX export with dynamic height and width serves every canvas of the deployment, and a
    TorchScript trace can be made per canvas.  The proposals per level are a constant
    (``settings.rpn_level_topk()``): a level with fewer anchors on a small canvas is padded
    with rows of level -1.

    ``extent_masks=False`` leaves the masks out (anchors outside an image still stay out of
    top-k).  Where every image's padded extent (its size rounded up to 32) is the canvas, each
    mask is all ones, so that network gives the same bits with fewer passes over the maps; the
    torch target's runner picks it for such batches only (:func:`python_backend.settings.fills_canvas`).

    Inputs:
        images ``[B, 3, H, W]`` float32: normalized, resized images zero-padded onto the canvas.
        image_sizes ``[B, 2]`` float32: each image's resized (height, width).
    Outputs:
        proposals ``[B, K, 6]``: ``x1 y1 x2 y2`` clipped to the image, objectness probability,
            RPN map index (resnet50_fpn: 0 = P2 ... 4 = P6; -1 = padding row).  Rows come level by level,
            each level by descending objectness logit, as torchvision's ``_get_top_n_idx``.
        the pooled maps ``[B, H/s, W/s, C]`` (``settings.feature_names``, strides
            ``settings.roi_strides``; resnet50_fpn: P2..P5), channels last (valid inside each
            image's padded extent).  Channels last lets the ROIAlign kernel read each bilinear tap of 32
            channels as one cache line.
    """

    def __init__(self, model: FasterRCNN, settings: DetectorSettings, fold_norms: bool = True,
                 extent_masks: bool = True):
        super().__init__()
        self.settings = settings
        self.backbone = copy.deepcopy(model.backbone).eval()
        if fold_norms:  # fewer nodes; rounds differently from torchvision's separate FrozenBatchNorm2d
            fold_batch_norms(self.backbone)
        self.head = copy.deepcopy(model.rpn.head).eval()
        self.box_coder = model.rpn.box_coder
        self.masks = _ExtentMasks()
        check_maskable(self.backbone, "backbone")
        check_maskable(self.head, "rpn.head")
        if extent_masks:  # without: exact only where every image's padded extent is the canvas (fills_canvas)
            _mask_spatial_inputs(self.backbone, self.masks)
            _mask_spatial_inputs(self.head, self.masks)
        gen = model.rpn.anchor_generator
        cells = gen.cell_anchors if gen.cell_anchors is not None else []
        self.strides = tuple(settings.rpn_strides)
        if len(cells) != len(self.strides):
            raise ValueError(f"the settings have {len(self.strides)} RPN maps (strides {self.strides}), the "
                             f"anchor generator anchors for {len(cells)}")
        for i, c in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", c.to(torch.float32).clone(), persistent=False)
        self.level_topk = settings.rpn_level_topk()
        self.pooled = tuple(settings.roi_featmap_names)

    def anchor_sizes(self) -> list[float]:
        """The longest side of each level's anchors (torchvision's AnchorGenerator sizes: 32..512)."""
        cells = [getattr(self, f"cell_anchors_{level}") for level in range(len(self.strides))]
        return [float((c[:, 2:] - c[:, :2]).max()) for c in cells]

    def _anchors(self, level: int, rows: Tensor, cols: Tensor, padded: Tensor) -> Tensor:
        """``[B, gh, gw, A, 4]`` anchors of one level, torchvision AnchorGenerator order (y, x, a).

        ``rows [B, gh]`` / ``cols [B, gw]`` only give the grid's size.  torchvision's stride is
        ``padded_size // grid_size`` per image: the stride exactly up to size_divisible, and beyond
        (P6: grid ceil(padded/64)) whatever that integer division gives."""
        base = getattr(self, f"cell_anchors_{level}")  # [A, 4]
        s = self.strides[level]
        grid = torch.ceil(padded / s)
        stride = torch.floor(padded / grid)  # [B, 2] (h, w)
        ys = torch.arange(_size(rows, 1), device=padded.device).to(torch.float32)[None, :] * stride[:, 0:1]
        xs = torch.arange(_size(cols, 1), device=padded.device).to(torch.float32)[None, :] * stride[:, 1:2]
        sy = ys[:, :, None] + torch.zeros_like(xs)[:, None, :]  # [B, gh, gw]
        sx = xs[:, None, :] + torch.zeros_like(ys)[:, :, None]
        shifts = torch.stack((sx, sy, sx, sy), dim=-1)[:, :, :, None, :]  # [B, gh, gw, 1, 4]
        return shifts + base[None, None, None]  # [B, gh, gw, A, 4]

    def forward(self, images: Tensor, image_sizes: Tensor):
        self.masks.reset(images, image_sizes, self.settings.size_divisible)
        feats = backbone_maps(self.backbone, images)
        maps = list(feats.values())  # resnet50_fpn: P2, P3, P4, P5, P6 ('pool')
        if len(maps) != len(self.strides):
            raise ValueError(f"the backbone returned {len(maps)} maps, the settings have strides {self.strides}")
        logits, deltas = self.head(maps)
        padded = self.masks.padded
        assert padded is not None
        # Map sizes stay symbolic (read from the maps, broadcasting): only the anchors per cell (A)
        # and the top-k sizes are constants, so an export may keep H and W dynamic.
        w_img = image_sizes[:, None, 1:2]  # [B, 1, 1]
        h_img = image_sizes[:, None, 0:1]
        zero = torch.zeros((), dtype=torch.float32, device=images.device)
        out = []
        for level, (lg, dl) in enumerate(zip(logits, deltas)):
            a, k = int(lg.shape[1]), self.level_topk[level]
            # torchvision concat_box_prediction_layers: [B, A, H, W] -> [B, H*W*A]
            gh, gw = _size(lg, 2), _size(lg, 3)
            lg = lg.permute(0, 2, 3, 1).reshape(-1, gh * gw * a)
            dl = dl.reshape(-1, a, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(-1, gh * gw * a, 4)
            rows, cols = self.masks.cells(maps[level], (self.strides[level], self.strides[level]))
            anchors = self._anchors(level, rows, cols, padded).reshape(-1, gh * gw * a, 4)
            valid = (rows[:, :, None, None] & cols[:, None, :, None]).expand(-1, -1, -1, a).reshape(-1, gh * gw * a)
            # k padding columns (score -inf, not valid) so that top-k of k is defined on any canvas
            pad = torch.zeros_like(lg[:, :1]).expand(-1, k)
            masked = torch.cat((torch.where(valid, lg, torch.full_like(lg, float("-inf"))), pad - float("inf")), 1)
            valid = torch.cat((valid, pad > 0), 1)
            dl = torch.cat((dl, pad[:, :, None].expand(-1, -1, 4)), 1)
            anchors = torch.cat((anchors, pad[:, :, None].expand(-1, -1, 4)), 1)
            top, idx = masked.topk(k, dim=1)
            idx4 = idx[:, :, None].expand(-1, -1, 4)
            sel_valid = torch.gather(valid, 1, idx)
            sel_deltas = torch.gather(dl, 1, idx4).reshape(-1, 4)
            sel_anchors = torch.gather(anchors, 1, idx4).reshape(-1, 4)
            boxes = self.box_coder.decode_single(sel_deltas, sel_anchors).reshape(-1, k, 4)
            # torchvision clip_boxes_to_image with each image's resized size
            x = torch.minimum(torch.maximum(boxes[:, :, 0::2], zero), w_img)
            y = torch.minimum(torch.maximum(boxes[:, :, 1::2], zero), h_img)
            prob = torch.where(sel_valid, torch.sigmoid(top), zero)
            lvl = torch.where(sel_valid, torch.full_like(prob, float(level)), torch.full_like(prob, -1.0))
            out.append(torch.stack((x[:, :, 0], y[:, :, 0], x[:, :, 1], y[:, :, 1], prob, lvl), dim=2))
        # the box RoI pooler's maps, as its _filter_input keeps them (the backbone's order)
        pooled = [m for k, m in feats.items() if k in self.pooled]
        return (torch.cat(out, dim=1), *(m.permute(0, 2, 3, 1).contiguous() for m in pooled))


def _fc6_channels_last(box_head: nn.Module, channels: int, size: int) -> bool:
    """Permute the first Linear of torchvision's TwoMLPHead so that it reads a flattened
    ``[S, S, C]`` RoI feature instead of ``[C, S, S]``: same outputs, no transpose at run time."""
    fc6 = getattr(box_head, "fc6", None)
    if not isinstance(fc6, nn.Linear) or fc6.in_features != channels * size * size:
        return False
    with torch.no_grad():
        w = fc6.weight.view(fc6.out_features, channels, size, size).permute(0, 2, 3, 1)
        fc6.weight.copy_(w.reshape(fc6.out_features, -1))
    return True


class HeaderNetwork(nn.Module):
    """Box head + predictor + box decode over R RoIs (R is the dynamic batch axis).

    Inputs: roi_features ``[R, 7, 7, 256]`` (channels last, as the ROIAlign step writes them),
    rois ``[R, 4]`` (x1 y1 x2 y2 on the resized image).
    Outputs: class_scores ``[R, C]`` softmax; class_boxes ``[R, C, 4]`` decoded, not clipped.
    """

    def __init__(self, model: FasterRCNN):
        super().__init__()
        self.box_head = copy.deepcopy(model.roi_heads.box_head).eval()
        size = int(model.roi_heads.box_roi_pool.output_size[0])
        channels = int(model.backbone.out_channels)
        # TwoMLPHead: fold the layout change into fc6; any other head gets an explicit permute
        self.permute_input = not _fc6_channels_last(self.box_head, channels, size)
        self.box_predictor = copy.deepcopy(model.roi_heads.box_predictor).eval()
        self.box_coder = model.roi_heads.box_coder
        self.num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)

    def forward(self, roi_features: Tensor, rois: Tensor):
        if self.permute_input:
            roi_features = roi_features.permute(0, 3, 1, 2)
        x = self.box_head(roi_features)
        class_logits, box_regression = self.box_predictor(x)
        scores = torch.softmax(class_logits, dim=-1)
        boxes = self.box_coder.decode_single(box_regression, rois)
        return scores, boxes.reshape(-1, self.num_classes, 4)
