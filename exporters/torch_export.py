"""Trace the split networks to TorchScript for the ``torch`` target (no TensorRT needed).

The ``torch`` target serves rpn and header as python-backend models that run these traces
with torch on the instance's GPU (:mod:`python_backend.triton_models.torch_runner`).

Why trace on the target device: :class:`~exporters.split.RpnNetwork` creates tensors in its
forward (anchor grids, extent masks, -inf fill values) without a ``device=`` argument, and
``torch.jit.trace`` records each factory call with the device it ran on.  Tracing under
``with torch.device("cuda")`` makes every such call a CUDA one in the graph; the device has no
index, so at run time it means the current device, which the runner sets to its instance's GPU.

Precisions (proposals, class scores and boxes are float32 in both):
  fp32  everything in float32, TF32 off.
  tf32  the fp32 networks with TF32 convolutions.  A trace records each convolution as
        ``aten::_convolution(..., benchmark, deterministic, cudnn_enabled, allow_tf32)`` with the
        flags ``torch.backends.cudnn`` had while tracing, as constants: the run-time switch
        (``cudnn.allow_tf32``) no longer reaches them, so tf32 gets traces of its own, recorded
        with TF32 on (:func:`trace`).  Matmuls (the header's linear layers) follow the runner's
        ``torch.backends.cuda.matmul.allow_tf32`` at run time.
  fp16  the dense parts (backbone + FPN + RPN head; box head + predictor) in float16; anchors,
        top-k, sigmoid/softmax, box decode and clipping in float32.  The FPN maps are float16
        outputs (the configs say TYPE_FP16; the roi step pools them in float32).  Box decode in float16 would
        put boxes ~0.5 px off at x ~ 1300 (float16 spacing there is 1 px).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from python_backend import names
from python_backend.settings import DetectorSettings

from .repository import canvas_key
from .split import HeaderNetwork, RpnNetwork

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16")


def _to_float(x):
    """Tensors (also inside lists/tuples, as the RPN head returns them) cast to float32."""
    if isinstance(x, Tensor):
        return x.float()
    return type(x)(_to_float(v) for v in x)


class _HalfInput(nn.Module):
    """Runs ``module`` (converted to float16) on its input cast to float16."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, x: Tensor):
        return self.module(x.half())


class _FloatOutputs(nn.Module):
    """Runs ``module`` (converted to float16) and casts every output tensor to float32."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, x):
        return _to_float(self.module(x))


def rpn_module(model, settings: DetectorSettings, precision: str = "fp32", extent_masks: bool = True) -> nn.Module:
    """``RpnNetwork`` in the given precision; same inputs, float32 proposals, and FPN maps in the
    precision's float type (exporters/specs.py ``maps_type``)."""
    _check_precision(precision)
    net = RpnNetwork(model, settings, extent_masks=extent_masks).eval()
    if precision != "fp16":  # fp32, tf32
        return net
    # Backbone takes float16 images; the RPN head returns float32 logits and deltas, so
    # top-k and box decode (with float32 anchors) stay in float32.
    net.backbone = _HalfInput(net.backbone)
    net.head = _FloatOutputs(net.head)
    # the extent masks take each conv input's dtype (split._ExtentMasks.mask), so they stay float16 here;
    # the FPN maps leave as float16: the roi step pools them in float32, and a float16 value
    # converts to float32 exactly, so casting them here would only double the bytes moved
    return net.eval()


def header_module(model, precision: str = "fp32") -> nn.Module:
    """``HeaderNetwork`` in the given precision; softmax and box decode stay float32."""
    _check_precision(precision)
    net = HeaderNetwork(model).eval()
    if precision == "fp16":
        net.box_head = _HalfInput(net.box_head)
        net.box_predictor = _FloatOutputs(net.box_predictor)
    return net


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def example_inputs(settings: DetectorSettings, device: torch.device, canvas: tuple[int, int], batch: int = 2,
                   rois: int = 8):
    """Inputs the traces are recorded with: rpn ``(images, image_sizes)`` on ``canvas`` (height,
    width), header ``(roi_features, rois)``.

    Image sizes differ per image so that no per-image value is folded into the trace as a constant.
    """
    h, w = canvas
    images = torch.zeros(batch, 3, h, w, device=device)
    sizes = torch.tensor([[h, w]] + [[h - 32 * i, w - 64 * i] for i in range(1, batch)], dtype=torch.float32,
                         device=device).clamp(min=32)
    s = settings.roi_output_size
    feats = torch.zeros(rois, s, s, settings.fpn_channels, device=device)  # channels last
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * rois, device=device)
    return (images, sizes), (feats, boxes)


def trace(module: nn.Module, inputs: tuple, device: torch.device, tf32: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` on ``device`` with factory calls defaulting to that device (see module doc);
    its convolutions keep ``tf32`` as their TF32 flag, and cuDNN's heuristics (no autotuner)."""
    module = module.to(device).eval()
    # "cuda" without an index: the trace then means "the current device" (see module doc).
    default = torch.device(device.type)
    with torch.no_grad(), default, _convolution_flags(tf32):
        traced = torch.jit.trace(module, inputs, check_trace=False)
    return traced


class _convolution_flags:
    """cuDNN's flags while tracing, which the trace keeps in every convolution (module doc): TF32 as
    asked, the autotuner off; matmul TF32 off.  Restores the previous flags."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc):
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = self.saved


def convolution_flags(traced: torch.jit.ScriptModule) -> set[tuple[bool, bool]]:
    """The (benchmark, allow_tf32) pairs a trace's convolutions carry."""
    flags = set()
    graph = traced.inlined_graph  # held: its nodes live only as long as it does
    for node in graph.findAllNodes("aten::_convolution"):
        args = list(node.inputs())
        flags.add((bool(args[-4].toIValue()), bool(args[-1].toIValue())))
    return flags


def resolve_device(device: str) -> torch.device:
    """``"gpu"``/``"cuda"`` -> cuda (raises if CUDA is absent), ``"cpu"`` -> cpu."""
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("the torch target for --device gpu is traced on the GPU it will run on, "
                               "but torch sees no CUDA device here")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def export_torch(model, settings: DetectorSettings, out_dir: Path, device: str = "gpu",
                 precision: str = "fp32", unmasked: bool = True) -> dict[str, Path]:
    """Trace the rpn at every canvas of ``settings.canvases`` and the header, into ``out_dir``;
    returns {"header": path, :func:`~exporters.repository.canvas_key` (h, w): path, ...}.

    One trace per canvas: a trace records the map sizes of its example as constants (the
    arithmetic on them would otherwise be host reads that break CUDA-graph capture;
    exporters/split.py ``_size``), so each canvas gets its own, served by
    ``python_backend.torch_runtime.CanvasNetworks``.  ``unmasked`` (as
    ``RepositoryOptions.torch_unmasked_rpn``, on by default): also the rpn without extent masks at
    every canvas (``canvas_key(h, w, unmasked=True)``), for batches that fill their canvas.
    """
    _check_precision(precision)
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rpns = {False: rpn_module(model, settings, precision)}
    if unmasked:
        rpns[True] = rpn_module(model, settings, precision, extent_masks=False)
    jobs = [(names.HEADER, header_module(model, precision), example_inputs(settings, dev, settings.canvases[0])[1])]
    jobs += [(canvas_key(h, w, unmasked=u), rpn, example_inputs(settings, dev, (h, w))[0])
             for u, rpn in rpns.items() for h, w in settings.canvases]
    paths = {}
    for name, module, inputs in jobs:
        log.info("tracing %s (%s) on %s", name, precision, dev)
        traced = trace(module, inputs, dev, tf32=precision == "tf32")
        path = out_dir / f"{name}.pt"
        torch.jit.save(traced, str(path))
        paths[name] = path
    return paths
