"""Run a serialized TensorRT engine once, with device buffers from torch (CUDA build) or CuPy."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .build import EngineBuildError, TensorRTUnavailable, require_tensorrt
from .gpus import use_device
from .profiles import profile_for


class _TorchDevice:
    def __init__(self, device_index: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_index)
        # the stream the uploads are queued on, so the engine runs after them
        self.stream = torch.cuda.current_stream(self.device)

    def to_device(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def empty(self, shape, dtype: np.dtype):
        t = self.torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        return self.torch.empty(tuple(shape), dtype=t, device=self.device)

    def ptr(self, a) -> int:
        return a.data_ptr()

    def handle(self) -> int:
        return self.stream.cuda_stream

    def sync(self) -> None:
        self.stream.synchronize()

    def to_host(self, a) -> np.ndarray:
        return a.cpu().numpy()


class _CupyDevice:
    def __init__(self, device_index: int):
        import cupy

        self.cp = cupy
        self.device = cupy.cuda.Device(device_index)
        with self.device:
            self.stream = cupy.cuda.get_current_stream()  # the uploads' stream (see _TorchDevice)

    def to_device(self, a: np.ndarray):
        with self.device:
            return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, shape, dtype: np.dtype):
        with self.device:
            return self.cp.empty(tuple(shape), dtype=dtype)

    def ptr(self, a) -> int:
        return a.data.ptr

    def handle(self) -> int:
        return self.stream.ptr

    def sync(self) -> None:
        self.stream.synchronize()

    def to_host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)


def _device_arrays(device_index: int):
    """Device buffers through torch (CUDA build) or CuPy, whichever works here."""
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchDevice(device_index)
    except ImportError:
        pass
    try:
        return _CupyDevice(device_index)
    except ImportError:
        raise TensorRTUnavailable("running an engine needs device buffers: install torch with CUDA or "
                                  "cupy-cuda12x") from None


def run_engine(plan_path: str | Path, inputs: Mapping[str, np.ndarray], device_index: int = 0) -> dict[str, np.ndarray]:
    """Run a serialized engine once on host ``inputs`` on CUDA device ``device_index``, with the first
    optimization profile that holds their shapes; returns every output on the host."""
    trt = require_tensorrt()
    dev = _device_arrays(device_index)
    # torch and CuPy make the device's primary context current for their own calls; TensorRT's
    # calls below need it current too
    with use_device(device_index):
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if engine is None:
            raise EngineBuildError(
                f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or GPU?)")
        context = engine.create_execution_context()
        io_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_names = [n for n in io_names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(input_names) != set(inputs):
            raise ValueError(f"engine {plan_path} takes inputs {sorted(input_names)}, got {sorted(inputs)}")
        profiles = [{n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, i)) for n in input_names}
                    for i in range(engine.num_optimization_profiles)]
        index = profile_for(profiles, {n: np.shape(inputs[n]) for n in input_names})
        if index is None:
            raise ValueError(f"input shapes {({n: np.shape(inputs[n]) for n in input_names})} are outside every "
                             f"profile of the engine (min, opt, max): {profiles}")
        if not context.set_optimization_profile_async(index, dev.handle()):
            raise EngineBuildError(f"cannot select optimization profile {index} of {plan_path}")
        buffers = {}
        for name in input_names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = np.asarray(inputs[name], dtype=dtype)
            if not context.set_input_shape(name, host.shape):
                raise ValueError(f"input {name!r} shape {host.shape} is outside the engine's profile {index} "
                                 f"{profiles[index][name]}")
            buffers[name] = dev.to_device(host)
            context.set_tensor_address(name, dev.ptr(buffers[name]))
        outputs = [n for n in io_names if n not in input_names]
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = dev.empty(shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            context.set_tensor_address(name, dev.ptr(buffers[name]))
        if not context.execute_async_v3(dev.handle()):
            raise EngineBuildError(f"execute_async_v3 failed for {plan_path}")
        dev.sync()
    return {name: dev.to_host(buffers[name]) for name in outputs}
