"""Tensor conversion between Triton's python backend and NumPy/CuPy.

The python backend of Triton 24.10 was built against numpy 1: under numpy 2 its numpy path
(``as_numpy()``, ``Tensor(name, ndarray)``) reads or sends garbage.  So host arrays use the numpy
path under numpy 1 and DLPack under numpy 2; GPU (CuPy) arrays always use DLPack, which keeps them
on the GPU.  No input is a string tensor (which DLPack can't carry, and which this stub garbles
under numpy 2): encoded images come as uint8 bytes.

The stub (``Tensor.from_dlpack``) marks a DLPack capsule it took as "used_dlpack", where the
DLPack protocol says "used_dltensor".  NumPy's and CuPy's capsule destructors then take it for an
unconsumed capsule, fail to read it, and print a "PyCapsule_GetPointer called with incorrect name"
traceback for every output tensor (seen on the GPU machine, numpy 2: docs/benchmarks.md, session
16); numpy 1's destructor then crashes the process (tests/test_adapter.py, with a stand-in stub).
:func:`output` hands the stub a capsule and gives it the protocol's name after the stub took it.
"""
from __future__ import annotations

import ctypes
import json
import os

import numpy as np

NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"

# private function objects (``pythonapi[name]`` makes a new one), so no one else's argtypes change
_capsule_is_valid = ctypes.pythonapi["PyCapsule_IsValid"]
_capsule_is_valid.argtypes, _capsule_is_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
_capsule_set_name = ctypes.pythonapi["PyCapsule_SetName"]
_capsule_set_name.argtypes, _capsule_set_name.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
# capsule names; PyCapsule_SetName keeps the pointer, so a name given must outlive the capsule
# (module constants do)
STUB_USED, DLPACK_USED = b"used_dlpack", b"used_dltensor"


class HostCapsule:
    """Lets ``np.from_dlpack`` take a CPU capsule from ``Tensor.to_dlpack()``."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, stream=None, **_):
        return self._capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def to_numpy(tensor) -> np.ndarray:
    """A Triton input tensor as a NumPy array (copied to host if it lives on the GPU)."""
    if tensor.is_cpu():
        return np.from_dlpack(HostCapsule(tensor.to_dlpack())) if NUMPY2 else tensor.as_numpy()
    import cupy as cp

    return cp.asnumpy(cp.from_dlpack(tensor.to_dlpack()))


def to_device_array(tensor):
    """A Triton input tensor as CuPy (GPU) or NumPy (CPU), without copying."""
    if tensor.is_cpu():
        return to_numpy(tensor)
    import cupy as cp

    return cp.from_dlpack(tensor.to_dlpack())


def output(pb_utils, name: str, array):
    """A Triton output tensor from a NumPy or CuPy array (a CuPy array's kernels must have
    finished: the stub takes a capsule as it is, without waiting on a stream)."""
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
        if not NUMPY2:
            return pb_utils.Tensor(name, array)
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    mark_consumed(capsule)
    return tensor


def mark_consumed(capsule) -> None:
    """Give a capsule the stub took ("used_dlpack") DLPack's name for a consumed one, so that
    its producer's destructor leaves it alone (the stub's tensor frees it)."""
    rename_capsule(capsule, STUB_USED, DLPACK_USED)


def rename_capsule(capsule, old: bytes, new: bytes) -> bool:
    """Rename a capsule named ``old`` to ``new`` (a module constant: the capsule keeps the
    pointer); whether it was named ``old``."""
    if not _capsule_is_valid(capsule, old):
        return False
    if _capsule_set_name(capsule, new) != 0:
        raise RuntimeError(f"could not rename a DLPack capsule to {new!r}")
    return True


def encoded_image(array: np.ndarray) -> bytes:
    """The encoded bytes of one image from an ``image`` input: ``[1, N]`` uint8 (the N bytes of a
    JPEG/PNG/...; Triton's DALI examples send encoded images this way).  A batch of several
    encoded images can't be one rectangular tensor, so a request carries exactly one.  Raises
    ``BadImageError`` naming the shape or dtype it got."""
    from .reference.image import BadImageError

    if array.dtype != np.uint8 or array.ndim != 2:
        raise BadImageError(f"expected the encoded image as uint8 [1, N], got {array.dtype} "
                            f"{list(array.shape)}")
    if array.shape[0] != 1:
        raise BadImageError(f"expected one encoded image per request ([1, N] uint8), got {array.shape[0]} "
                            "rows: send each image as its own request")
    return array[0].tobytes()


def request_images(pb_utils, request, raw: bool, settings, defer_jpeg: bool = False) -> list:
    """The decoded ``[H, W, 3]`` uint8 images of one request: ``image_raw`` as sent (``raw``) or the
    ``image`` bytes decoded.  Both are uint8 tensors, read like every other input (numpy 1 and
    numpy 2 alike).  Raises ``BadImageError`` naming what is wrong with an image.  ``defer_jpeg``:
    a JPEG a GPU decodes stays encoded, checked (``reference.image.EncodedJpeg``)."""
    return payload_images(request_payload(pb_utils, request, raw), settings, defer_jpeg)


def request_payload(pb_utils, request, raw: bool):
    """What one request carries, read but not decoded: ``image_raw``'s ``[B, H, W, 3]`` uint8 array
    (``raw``) or the ``image`` input's encoded bytes.  Raises ``BadImageError`` for an ``image``
    input of the wrong shape or dtype."""
    from . import names

    if raw:
        return to_numpy(pb_utils.get_input_tensor_by_name(request, names.IMAGE_RAW))
    return encoded_image(to_numpy(pb_utils.get_input_tensor_by_name(request, names.IMAGE_BYTES)))


def payload_images(payload, settings, defer_jpeg: bool = False) -> list:
    """A :func:`request_payload` -> its checked ``[H, W, 3]`` uint8 images: encoded bytes decoded by
    Pillow (which releases the GIL while it decodes, so threads decode side by side), an array
    checked image by image.  Raises ``BadImageError``; ``defer_jpeg`` as in :func:`request_images`."""
    from .reference.image import check_image_array, decode_image

    if isinstance(payload, np.ndarray):
        images = list(payload)
        for im in images:
            check_image_array(im, settings.max_input_pixels, settings.min_input_side)
        return images
    return [decode_image(payload, settings.max_input_pixels, settings.min_input_side, defer_jpeg=defer_jpeg)]


MAX_AUTO_THREADS = 8  # decode threads of a preprocess instance whose parameter says "0"


def decode_threads(text: str) -> int:
    """Preprocess's parameter ``decode_threads`` -> how many threads decode: "0" is one per CPU of
    this machine, at most :data:`MAX_AUTO_THREADS`."""
    n = int(text)
    if n < 0:
        raise ValueError(f"decode_threads must be >= 0 (0: one per CPU), got {text!r}")
    return n or max(1, min(MAX_AUTO_THREADS, os.cpu_count() or 1))


def model_parameters(args: dict) -> dict[str, str]:
    """``parameters`` of the model config given to ``initialize``, as {key: string_value}."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}

