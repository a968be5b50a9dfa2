"""The one adapter between Triton's python backend and the Triton-free steps.

Every ``model.py`` of this folder builds one :class:`StepAdapter` in ``initialize`` and hands
each ``execute`` to :meth:`StepAdapter.execute` with the function that runs its step.  Once, at
``initialize``, the adapter

* reads the model config: input names, dtypes and dims, output names, ``max_batch_size`` and the
  parameters (:class:`~python_backend.settings.DetectorSettings` among them);
* takes the instance's device from ``model_instance_kind`` / ``model_instance_device_id``: a
  ``KIND_GPU`` instance runs on its own GPU, made current for CuPy (by
  :func:`python_backend.backends.get_backend`) or for torch (``torch.cuda.set_device``), so that
  no instance falls back to device 0 on a host with several GPUs;
* picks the step backend (NumPy or CuPy) once.

Per ``execute``, each request's inputs are read (DLPack; see :mod:`python_backend.triton_io`) and
checked against the config's dtypes and dims; a request that fails gets its own error response.
The good requests then run as one batch.  If that call raises, each request runs alone, so that
only the requests that fail get an error and their batch-mates still get results (the Triton
python_backend examples' rule: a bad request gets ``InferenceResponse(error=...)``, the rest of
the batch is served).

Value checks that need the data itself (:meth:`StepAdapter.check_values`) run on the joined
batch inside the step's call: one host read per batch instead of one per request, and a
failure is traced to its request by the per-request fallback.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback
from typing import Callable, Sequence

import numpy as np

from python_backend import backends, names
from python_backend.settings import DetectorSettings, format_canvases, level_grid
from python_backend.triton_io import model_parameters, output, to_device_array, to_numpy

# Triton config data types -> array dtype names (NumPy's, which CuPy and torch share after "torch.")
DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT32": "int32", "TYPE_INT64": "int64",
          "TYPE_UINT8": "uint8", "TYPE_BOOL": "bool"}
ARRAYS = ("backend", "numpy", "torch")


class BadRequest(ValueError):
    """A request's own fault; its message goes back to the caller as that request's error."""


def dtype_name(dtype) -> str:
    """``float32`` for NumPy, CuPy and torch dtypes alike."""
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).replace("torch.", "")


class TensorSpec:
    """One config input: name, dtype name and full shape (batch axis as -1 for a batching model)."""

    def __init__(self, name: str, data_type: str, dims: Sequence[int], batching: bool):
        if data_type not in DTYPES:
            raise ValueError(f"input {name!r}: data type {data_type} is not read by this adapter "
                             f"(expected one of {sorted(DTYPES)}); read it with a model-specific reader")
        self.name, self.dtype = name, DTYPES[data_type]
        self.shape = ((-1,) if batching else ()) + tuple(int(d) for d in dims)

    def check(self, array) -> None:
        """Raise :class:`BadRequest` naming the input, what was expected and what came."""
        got = dtype_name(array.dtype)
        if got != self.dtype:
            raise BadRequest(f"input {self.name!r}: expected dtype {self.dtype}, got {got}")
        shape = tuple(int(d) for d in array.shape)
        if len(shape) != len(self.shape) or any(w not in (-1, g) for w, g in zip(self.shape, shape)):
            raise BadRequest(f"input {self.name!r}: expected shape {list(self.shape)} (-1: any), got {list(shape)}")


def rows(items: Sequence[dict], name: str) -> list[int]:
    """Each request's length along the batch axis of input ``name``."""
    return [int(item[name].shape[0]) for item in items]


def split(outputs: Sequence, counts: Sequence[int]) -> list[tuple]:
    """Batch outputs (each with the batch axis first) -> one tuple of slices per request."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    return [tuple(o[a:b] for o in outputs) for a, b in zip(bounds[:-1], bounds[1:])]


def request_canvas(inputs: dict, settings: DetectorSettings) -> tuple[int, int] | None:
    """The canvas (height, width) of a batch, read from its shapes: the rpn's ``images [B, 3, H, W]``
    or the roi step's pooled maps (``settings.feature_names``, each ``[B, H/s, W/s, C]``, s from
    ``settings.roi_strides``); None when ``inputs`` has neither.

    Raises :class:`BadRequest` unless it is one of the settings' canvases (the networks are served
    for those: a TensorRT profile or a TorchScript trace each) and the maps agree with it."""
    if names.IMAGES in inputs:
        canvas, what = tuple(int(d) for d in inputs[names.IMAGES].shape[-2:]), names.IMAGES
    elif settings.feature_names[0] in inputs:
        first, stride = inputs[settings.feature_names[0]].shape, settings.roi_strides[0]
        canvas, what = (int(first[1]) * stride, int(first[2]) * stride), settings.feature_names[0]
    else:
        return None
    if canvas not in settings.canvases:
        raise BadRequest(f"{what}: a {canvas[0]}x{canvas[1]} canvas (height x width); expected one of the "
                         f"canvases {format_canvases(settings.canvases)}")
    for name, stride in zip(settings.feature_names, settings.roi_strides):
        if name in inputs:
            got = tuple(int(d) for d in inputs[name].shape[1:3])
            want = (level_grid(canvas[0], stride), level_grid(canvas[1], stride))
            if got != want:
                raise BadRequest(f"{name}: expected a {want[0]}x{want[1]} map (the {canvas[0]}x{canvas[1]} canvas "
                                 f"/ {stride}), got {got[0]}x{got[1]}")
    return canvas


def check_image_sizes(sizes: np.ndarray, canvas: tuple[int, int]) -> None:
    """``image_sizes [B, 2]``: each resized (height, width) at least 1 and within the canvas.  The rpn
    masks and ROIAlign read each image's extent from it; a larger one would read past the maps."""
    ch, cw = canvas
    for i, (h, w) in enumerate(np.asarray(sizes, dtype=np.float64).reshape(-1, 2)):
        if not (1 <= h <= ch and 1 <= w <= cw):  # NaN fails too
            raise BadRequest(f"{names.IMAGE_SIZES}[{i}] = ({h:g}, {w:g}): expected a resized (height, width) "
                             f"within the {ch}x{cw} canvas (height 1..{ch}, width 1..{cw})")


def check_boxes(name: str, boxes: np.ndarray) -> None:
    """``[N, 4]`` boxes x1 y1 x2 y2: finite, with x1 <= x2 and y1 <= y2 (zero area allowed: the
    roi step's filler RoI is all zeros)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = ~np.isfinite(b).all(axis=1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadRequest(f"{name}[{i}] = {b[i].tolist()}: expected finite x1 y1 x2 y2 with x1 <= x2 and y1 <= y2")


def check_counts(counts: np.ndarray, lengths: dict) -> None:
    """``num_rois`` of one request against the leading axes of its tensors (``lengths``: name -> rows)."""
    images = lengths[names.NUM_ROIS]
    for name in (names.IMAGE_SIZES, names.ORIGINAL_SIZES):
        if lengths[name] != images:
            raise BadRequest(f"{name}: expected one row per image ({images}, as in {names.NUM_ROIS}), "
                             f"got {lengths[name]}")
    if (counts < 0).any():
        raise BadRequest(f"{names.NUM_ROIS}: expected counts >= 0, got {counts.tolist()}")
    total, scores = int(counts.sum()), lengths[names.CLASS_SCORES]
    if not (scores == total or (total == 0 and scores <= 1)):
        raise BadRequest(f"{names.NUM_ROIS} sums to {total} RoIs but {names.CLASS_SCORES} has {scores} rows; "
                         "expected them to agree (or no RoI and at most the roi step's one filler row)")
    if lengths[names.CLASS_BOXES] != scores:
        raise BadRequest(f"{names.CLASS_BOXES}: expected {scores} rows (as {names.CLASS_SCORES}), "
                         f"got {lengths[names.CLASS_BOXES]}")


class _BackendArrays:
    """The step backend's arrays: NumPy on a CPU instance, CuPy on the instance's GPU (a CPU
    input is copied up; a GPU input stays where it is)."""

    def __init__(self, backend):
        self.backend = backend

    def read(self, tensor):
        return self.backend.asarray(to_device_array(tensor))

    def join(self, arrays: list):
        return arrays[0] if len(arrays) == 1 else self.backend.xp.concatenate(arrays)

    def to_host(self, array) -> np.ndarray:
        return self.backend.to_host(array)

    def ready(self) -> None:
        # Tensor.from_dlpack hands Triton the memory, which the next step (another process) reads:
        # the kernels writing it must have finished
        if self.backend.device == "gpu":
            self.backend.xp.cuda.get_current_stream().synchronize()

    def write(self, pb_utils, name: str, array):
        return output(pb_utils, name, array)


class _HostArrays(_BackendArrays):
    """NumPy always (ONNX Runtime on the CPU): a GPU input is copied to the host."""

    def read(self, tensor):
        return to_numpy(tensor)

    def join(self, arrays: list):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class _TorchArrays:
    """torch tensors on the instance's device (CPU, or its GPU, made current at construction).

    On a GPU: fp32 means fp32 (no TF32 in convolutions or matmuls; cuDNN's default is TF32 on) and
    the ``tf32`` precision turns TF32 on for both,
    and this process's caching allocator is capped at ``memory_gib`` GiB (or the whole card, if
    smaller): the steps of the ensemble share the GPU, each in its own process, and cuDNN's plans
    otherwise take workspaces of tens of GiB, which the allocator keeps.
    """

    def __init__(self, device: str, device_id: int, memory_gib: float, tf32: bool = False):
        import torch

        self.torch = torch
        if device == "gpu":
            self.device = torch.device("cuda", device_id)
            # traces saved on the GPU hold index-less "cuda" tensors: the current device
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib * 2**30 / total), self.device)
        else:
            self.device = torch.device("cpu")

    def read(self, tensor):
        return self.torch.from_dlpack(tensor.to_dlpack()).to(self.device, non_blocking=True)

    def join(self, arrays: list):
        return arrays[0] if len(arrays) == 1 else self.torch.cat(arrays)

    def to_host(self, array) -> np.ndarray:
        return array.detach().cpu().numpy()

    def ready(self) -> None:
        # Tensor.from_dlpack hands Triton the memory: the kernels writing it must have finished
        if self.device.type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()

    def write(self, pb_utils, name: str, array):
        array = array.contiguous()
        if array.device.type == "cuda":
            return pb_utils.Tensor.from_dlpack(name, array)
        return output(pb_utils, name, array.numpy())  # host: triton_io's numpy 1 / numpy 2 paths


class StepAdapter:
    """Config, device, backend and request handling of one model instance (see the module docstring).

    Args:
        args: the dict Triton passes to ``initialize``.
        pb_utils: the ``triton_python_backend_utils`` module (a stand-in in the unit tests).
        arrays: what the step computes on: "backend" (NumPy or CuPy by the instance's kind, through
            the step backend), "numpy" (always the host: ONNX Runtime on the CPU) or "torch"
            (torch tensors on the instance's device; on a GPU, the model parameter
            ``gpu_memory_gib``, default 4, caps this process's memory on the card).
    """

    def __init__(self, args: dict, pb_utils, arrays: str = "backend"):
        if arrays not in ARRAYS:
            raise ValueError(f"arrays must be one of {ARRAYS}, got {arrays!r}")
        self.pb_utils = pb_utils
        self.name = args["model_name"]
        self.config = json.loads(args["model_config"])
        self.params = model_parameters(args)
        self.settings = DetectorSettings.from_parameters(self.params)
        self.max_batch = int(self.config.get("max_batch_size", 0))
        self.inputs = [TensorSpec(i["name"], i["data_type"], i["dims"], self.max_batch > 0)
                       for i in self.config["input"] if i["data_type"] != "TYPE_STRING"]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [o["name"] for o in self.config["output"]]
        self.device, self.device_id = instance_device(args)
        declared = self.params.get("device", self.device)
        if declared != self.device:
            raise ValueError(f"{self.name}: the config's parameter device is {declared!r} but this instance is "
                             f"KIND_{args['model_instance_kind']}; expected the two to agree")
        if arrays == "torch":
            self.backend = None
            self.arrays = _TorchArrays(self.device, self.device_id, float(self.params.get("gpu_memory_gib", "4")),
                                       tf32=self.params.get("precision") == "tf32")
        elif arrays == "numpy":
            self.backend = backends.get_backend("cpu")
            self.arrays = _HostArrays(self.backend)
            if self.device == "gpu":  # GPU inputs are copied to the host by CuPy, on this instance's device
                importlib.import_module("cupy").cuda.Device(self.device_id).use()
        else:
            self.backend = backends.get_backend(self.device, self.device_id)
            self.arrays = _BackendArrays(self.backend)

    # --- per request -------------------------------------------------------------------------------

    def read(self, request) -> dict:
        """Every input of ``request`` as an array, checked against the config's dtype and dims."""
        item = {}
        for spec in self.inputs:
            tensor = self.pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise BadRequest(f"missing input {spec.name!r}")
            item[spec.name] = array = self.arrays.read(tensor)
            spec.check(array)
        return item

    def join(self, items: Sequence[dict], name: str):
        """Input ``name`` of every request, joined along the batch axis (no copy for one request)."""
        return self.arrays.join([item[name] for item in items])

    def to_host(self, array) -> np.ndarray:
        return self.arrays.to_host(array)

    def check_values(self, inputs: dict):
        """Checks of the inputs, on a joined batch: the canvas of the images or maps
        (:func:`request_canvas`) and ``image_sizes`` within it, ``rois`` ordered finite boxes
        (whichever of these ``inputs`` holds).  Returns the host copy of ``image_sizes`` it
        checked (None where it checked none), for a caller that needs them on the host too."""
        canvas = request_canvas(inputs, self.settings)
        sizes = None
        if canvas is not None and names.IMAGE_SIZES in inputs:
            sizes = self.to_host(inputs[names.IMAGE_SIZES])
            check_image_sizes(sizes, canvas)
        if names.ROIS in inputs:
            check_boxes(names.ROIS, self.to_host(inputs[names.ROIS]))
        return sizes

    # --- per execute -------------------------------------------------------------------------------

    def execute(self, requests: Sequence, run: Callable[[list], list], read: Callable | None = None) -> list:
        """One response per request, in order.

        ``read(request)`` (default :meth:`read`) gives a request's item or raises: that request
        gets the error.  ``run(items)`` runs the good requests' items as one batch and returns one
        sequence of output arrays (config output order) per item; if it raises, each item runs
        alone, so the error stays with the request(s) it belongs to.
        """
        read = read or self.read
        responses: list = [None] * len(requests)
        good = []
        for i, request in enumerate(requests):
            try:
                good.append((i, read(request)))
            except Exception as e:  # noqa: BLE001 - any failure is this request's error
                responses[i] = self._error(e)
        if not good:
            return responses
        try:
            self._respond(responses, good, run([item for _, item in good]))
        except Exception as e:  # noqa: BLE001
            if len(good) == 1:
                responses[good[0][0]] = self._error(e)
                return responses
            print(f"{self.name}: a batch of {len(good)} requests failed ({type(e).__name__}: {e}); "
                  "running each request alone", file=sys.stderr, flush=True)
            for i, item in good:
                try:
                    self._respond(responses, [(i, item)], run([item]))
                except Exception as e1:  # noqa: BLE001
                    responses[i] = self._error(e1)
        return responses

    def _respond(self, responses: list, good: list, outputs: list) -> None:
        if len(outputs) != len(good):
            raise RuntimeError(f"{self.name}: the step returned {len(outputs)} results for {len(good)} requests")
        self.arrays.ready()
        made = [self.pb_utils.InferenceResponse(output_tensors=[
            self.arrays.write(self.pb_utils, n, a) for n, a in zip(self.output_names, outs)]) for outs in outputs]
        for (i, _), response in zip(good, made):
            responses[i] = response

    def _error(self, error: Exception):
        if isinstance(error, BadRequest):
            message = str(error)
        else:
            message = f"{self.name}: {type(error).__name__}: {error}"
            print(f"{self.name}: request failed\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return self.pb_utils.InferenceResponse(output_tensors=[], error=self.pb_utils.TritonError(message))


def instance_device(args: dict) -> tuple[str, int]:
    """("gpu", the instance's device id) for a ``KIND_GPU`` instance, else ("cpu", 0)."""
    if args.get("model_instance_kind") == "GPU":
        return "gpu", int(args["model_instance_device_id"])
    return "cpu", 0
