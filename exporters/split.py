"""Faster R-CNN split into the two dense networks that TensorRT can take.

``RpnNetwork``: backbone + FPN + RPN head, anchors decoded, top-k per level, on a fixed canvas.
``HeaderNetwork``: box head + predictor + box decode over a dynamic number of RoIs.

Why the canvas needs care: torchvision pads each batch only to the largest image rounded up
to 32, so an image served alone sees zeros (conv padding) right after its own padded extent.
On a larger canvas it would see activations of the padding instead, and its results would
depend on the canvas and the batch.  ``RpnNetwork`` therefore zeroes every activation outside
the image's own padded extent before each spatial conv or pool, and anchors outside that
extent are kept out of top-k.  With that, an image's proposals and FPN maps (inside its
extent) are the ones torchvision computes for that image alone.

Two ways to do the zeroing (``RpnNetwork(masking=...)``):

* ``"full"`` multiplies each spatial conv's and pool's input by a 0/1 mask of the extent: one
  pass over the whole activation per conv.  The ONNX export (TensorRT) uses it.
* ``"halo"`` zeroes, in place, only the cells outside the extent that a valid output cell
  reads: for a conv with kernel k, stride s and padding p the last valid output reads
  ``k - s - p`` rows (columns) past the extent, so 1 for a 3x3 stride-1 conv, 2 for the 7x7
  stem, none for the stride-2 3x3 convs and the max pool.  Past that halo, cells keep whatever
  the network computed there; no valid cell ever reads them.  This holds when each extent is
  a multiple of the module's stride, which the padding to 32 guarantees for ResNet's strides
  (at most 2 per module, 16 at the deepest stride-2 input).  It writes a few rows and columns
  instead of every activation, and the torch target uses it.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from python_backend.settings import RPN_STRIDES, SIZE_DIVISIBLE, DetectorSettings


MASKINGS = ("full", "halo")


class _ExtentMasks:
    """Per-forward cache of {(h, w): [B, 1, h, w] float mask} for one canvas."""

    def __init__(self, canvas: tuple[int, int]):
        self.canvas = canvas
        self.padded: Tensor | None = None  # [B, 2] float: each image's padded (h, w)
        self.cache: dict[tuple[int, int], Tensor] = {}

    def reset(self, image_sizes: Tensor) -> None:
        self.padded = torch.ceil(image_sizes / SIZE_DIVISIBLE) * SIZE_DIVISIBLE
        self.cache = {}

    def valid_extent(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Each image's valid rows and columns on a map of size (h, w) on this canvas.

        A map at stride s holds ceil(padded / s) valid cells: exact for P2..P5 (padded is a
        multiple of 32) and LastLevelMaxPool's round-up for P6."""
        assert self.padded is not None
        sh = 2 ** round(math.log2(self.canvas[0] / h))
        sw = 2 ** round(math.log2(self.canvas[1] / w))
        return torch.ceil(self.padded[:, 0] / sh), torch.ceil(self.padded[:, 1] / sw)

    def halo_cells(self, h: int, w: int, rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cells ``(image, row, col)`` of the ``rows`` rows and ``cols`` columns just past each
        image's extent on a map of size (h, w), and a flag for the entries that fall off the
        map.  Those point at the image's cell (0, 0), always valid, which is written back
        unchanged.  Every image has the same number of entries, so the trace has no
        data-dependent shape."""
        key = ("halo", int(h), int(w), int(rows), int(cols))  # static under tracing, as in mask()
        _, h, w, rows, cols = key
        if key not in self.cache:
            vh, vw = (v.to(torch.int64) for v in self.valid_extent(h, w))
            dev = vh.device
            rr = vh[:, None] + torch.arange(rows, device=dev)[None, :]  # [B, rows]
            cc = vw[:, None] + torch.arange(cols, device=dev)[None, :]  # [B, cols]
            zb = torch.zeros_like(vh)[:, None, None]  # [B, 1, 1]: the batch axis without reading its size
            all_r = torch.arange(h, device=dev)[None, :, None] + zb  # [B, h, 1]
            all_c = torch.arange(w, device=dev)[None, None, :] + zb  # [B, 1, w]
            r = torch.cat((rr[:, :, None].expand(-1, rows, w).reshape(-1, rows * w),
                           all_r.expand(-1, h, cols).reshape(-1, h * cols)), dim=1)
            c = torch.cat((all_c.expand(-1, rows, w).reshape(-1, rows * w),
                           cc[:, None, :].expand(-1, h, cols).reshape(-1, h * cols)), dim=1)
            off = (r >= h) | (c >= w)
            zero = torch.zeros((), dtype=torch.int64, device=dev)
            b = (torch.ones_like(vh).cumsum(0) - 1)[:, None].expand_as(r)
            self.cache[key] = (b.reshape(-1), torch.where(off, zero, r).reshape(-1),
                               torch.where(off, zero, c).reshape(-1), off.reshape(-1))
        return self.cache[key]

    def zero_halo_(self, x: Tensor, rows: int, cols: int) -> Tensor:
        """Zero ``x``'s halo cells (see :meth:`halo_cells`) in place, in any memory format."""
        b, r, c, off = self.halo_cells(x.shape[-2], x.shape[-1], rows, cols)
        cells = x[b, :, r, c]  # [N, C]
        x[b, :, r, c] = torch.where(off[:, None], cells, torch.zeros((), dtype=x.dtype, device=x.device))
        return x

    def mask(self, h: int, w: int) -> Tensor:
        key = (int(h), int(w))  # static under tracing: the canvas fixes every map size
        if key not in self.cache:
            vh, vw = self.valid_extent(*key)
            rows = torch.arange(key[0], dtype=torch.float32, device=vh.device)[None, :] < vh[:, None]
            cols = torch.arange(key[1], dtype=torch.float32, device=vw.device)[None, :] < vw[:, None]
            self.cache[key] = (rows[:, None, :, None] & cols[:, None, None, :]).to(torch.float32)
        return self.cache[key]


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode batch norm into the convolution before it, in place; returns how many.

    torchvision's ResNet pairs ``convN`` with ``bnN`` in a block (and the stem), and ``downsample``
    is ``Sequential(conv, bn)``.  Pretrained backbones use ``FrozenBatchNorm2d``, backbones built
    without weights ``BatchNorm2d``; both hold running statistics, an affine and ``eps``.  The
    fused convolution computes ``bn(conv(x))`` with the normalization in its weights and bias
    (what TensorRT does by itself) and the graph has 53 fewer nodes.  For the torch target it is
    not a speed-up at batch 8: torch adds a cuDNN convolution's bias in a separate pass, which
    costs what the batch norm did (H100, docs/benchmarks.md); at batch 1 it saves launches.
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


def _halo(m: nn.Module) -> tuple[int, int] | None:
    """Rows and columns past the extent that module ``m``'s last valid output reads, or None
    where the rule does not apply (dilation, string padding, ceil mode)."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or pair(m.dilation) != (1, 1):
            return None
    elif getattr(m, "ceil_mode", False) or pair(getattr(m, "dilation", 1)) != (1, 1):
        return None
    k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
    return max(0, k[0] - s[0] - p[0]), max(0, k[1] - s[1] - p[1])


def _mask_spatial_inputs(module: nn.Module, masks: _ExtentMasks, masking: str = "full") -> int:
    """Zero what each conv wider than 1x1 and each max pool would read outside each image's
    extent (module doc: ``masking`` "full" or "halo"); returns how many modules got a hook."""
    count = 0

    def full(_mod, args):
        x = args[0]
        return (x * masks.mask(x.shape[-2], x.shape[-1]),) + tuple(args[1:])

    def halo_hook(rows, cols):
        def hook(_mod, args):
            masks.zero_halo_(args[0], rows, cols)
            return args
        return hook

    for m in module.modules():
        spatial_conv = isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)
        if not (spatial_conv or isinstance(m, nn.MaxPool2d)):
            continue
        halo = _halo(m) if masking == "halo" else None
        if halo is None:
            m.register_forward_pre_hook(full)
        elif halo == (0, 0):
            continue
        else:
            m.register_forward_pre_hook(halo_hook(*halo))
        count += 1
    return count


class RpnNetwork(nn.Module):
    """Backbone + FPN + RPN head with anchors decoded and top-k per level.

    Inputs:
        images ``[B, 3, H, W]`` float32: normalized, resized images zero-padded onto the canvas.
        image_sizes ``[B, 2]`` float32: each image's resized (height, width).
    Outputs:
        proposals ``[B, K, 6]``: ``x1 y1 x2 y2`` clipped to the image, objectness probability,
            FPN level index (0 = P2 ... 4 = P6, -1 = padding row).  Rows come level by level,
            each level by descending objectness logit, as torchvision's ``_get_top_n_idx``.
        P2..P5 ``[B, H/s, W/s, 256]``: FPN maps, channels last (valid inside each image's padded
            extent).  Channels last lets the ROIAlign kernel read each bilinear tap of 32
            channels as one cache line.
    """

    def __init__(self, model: FasterRCNN, settings: DetectorSettings, masking: str = "full"):
        super().__init__()
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        self.settings = settings
        self.masking = masking
        self.backbone = copy.deepcopy(model.backbone).eval()
        fold_batch_norms(self.backbone)
        self.head = copy.deepcopy(model.rpn.head).eval()
        self.box_coder = model.rpn.box_coder
        self.masks = _ExtentMasks(settings.canvas)
        _mask_spatial_inputs(self.backbone, self.masks, masking)
        _mask_spatial_inputs(self.head, self.masks, masking)
        gen = model.rpn.anchor_generator
        cells = gen.cell_anchors if gen.cell_anchors is not None else []
        if len(cells) != len(RPN_STRIDES):
            raise ValueError(f"expected anchors for {len(RPN_STRIDES)} FPN levels, got {len(cells)}")
        for i, c in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", c.to(torch.float32).clone(), persistent=False)
        self.level_topk = settings.rpn_level_topk()

    def _anchors(self, level: int, gh: int, gw: int, padded: Tensor) -> Tensor:
        """``[B, gh*gw*A, 4]`` anchors of one level, torchvision AnchorGenerator order (y, x, a).

        torchvision's stride is ``padded_size // grid_size`` per image: 4..32 exactly for P2..P5,
        and for P6 (grid ceil(padded/64)) whatever that integer division gives."""
        base = getattr(self, f"cell_anchors_{level}")  # [A, 4]
        s = RPN_STRIDES[level]
        grid = torch.ceil(padded / s)
        stride = torch.floor(padded / grid)  # [B, 2] (h, w)
        ys = torch.arange(gh, dtype=torch.float32, device=padded.device)[None, :] * stride[:, 0:1]  # [B, gh]
        xs = torch.arange(gw, dtype=torch.float32, device=padded.device)[None, :] * stride[:, 1:2]  # [B, gw]
        sy = ys[:, :, None].expand(-1, gh, gw)
        sx = xs[:, None, :].expand(-1, gh, gw)
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, gh * gw, 1, 4)
        return (shifts + base[None, None]).reshape(-1, gh * gw * int(base.shape[0]), 4)

    def _valid_anchors(self, gh: int, gw: int, num_cell: int) -> Tensor:
        vh, vw = self.masks.valid_extent(gh, gw)
        rows = torch.arange(gh, dtype=torch.float32, device=vh.device)[None, :] < vh[:, None]
        cols = torch.arange(gw, dtype=torch.float32, device=vw.device)[None, :] < vw[:, None]
        cells = rows[:, :, None] & cols[:, None, :]  # [B, gh, gw]
        return cells[:, :, :, None].expand(-1, gh, gw, num_cell).reshape(-1, gh * gw * num_cell)

    def forward(self, images: Tensor, image_sizes: Tensor):
        self.masks.reset(image_sizes)
        if self.masking == "halo":  # a fresh tensor past the extent, so the stem's halo is zeroed in place in it
            images = images * self.masks.mask(images.shape[-2], images.shape[-1])
        feats = self.backbone(images)
        maps = list(feats.values())  # P2, P3, P4, P5, P6 ('pool')
        logits, deltas = self.head(maps)
        padded = self.masks.padded
        assert padded is not None
        # Reshapes keep the batch as -1 and every other dimension a Python int, so the ONNX
        # graph has static shapes except the batch.
        w_img = image_sizes[:, None, 1:2]  # [B, 1, 1]
        h_img = image_sizes[:, None, 0:1]
        dev = images.device
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        out = []
        for level, (lg, dl) in enumerate(zip(logits, deltas)):
            a, gh, gw = int(lg.shape[1]), int(lg.shape[2]), int(lg.shape[3])
            k = self.level_topk[level]
            # torchvision concat_box_prediction_layers: [B, A, H, W] -> [B, H*W*A]
            lg = lg.permute(0, 2, 3, 1).reshape(-1, gh * gw * a)
            dl = dl.reshape(-1, a, 4, gh, gw).permute(0, 3, 4, 1, 2).reshape(-1, gh * gw * a, 4)
            anchors = self._anchors(level, gh, gw, padded).reshape(-1, gh * gw * a, 4)
            valid = self._valid_anchors(gh, gw, a).reshape(-1, gh * gw * a)
            masked = torch.where(valid, lg, torch.tensor(float("-inf"), device=dev))
            top, idx = masked.topk(k, dim=1)
            idx4 = idx[:, :, None].expand(-1, k, 4)
            sel_valid = torch.gather(valid, 1, idx)
            sel_deltas = torch.gather(dl, 1, idx4).reshape(-1, 4)
            sel_anchors = torch.gather(anchors, 1, idx4).reshape(-1, 4)
            boxes = self.box_coder.decode_single(sel_deltas, sel_anchors).reshape(-1, k, 4)
            # torchvision clip_boxes_to_image with each image's resized size
            x = torch.minimum(torch.maximum(boxes[:, :, 0::2], zero), w_img)
            y = torch.minimum(torch.maximum(boxes[:, :, 1::2], zero), h_img)
            prob = torch.where(sel_valid, torch.sigmoid(top), zero)
            lvl = torch.where(sel_valid, torch.tensor(float(level), device=dev), torch.tensor(-1.0, device=dev))
            out.append(torch.stack((x[:, :, 0], y[:, :, 0], x[:, :, 1], y[:, :, 1], prob, lvl), dim=2))
        return (torch.cat(out, dim=1), *(m.permute(0, 2, 3, 1).contiguous() for m in maps[:4]))


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
