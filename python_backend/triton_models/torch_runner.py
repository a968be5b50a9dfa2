"""Triton model: run the rpn or header TorchScript (``model.pt``) with torch (the ``torch`` target).

Made by :mod:`exporters.torch_export`.  Loads the trace on this instance's device (its GPU for
KIND_GPU, the CPU for KIND_CPU), reads inputs through DLPack (GPU tensors stay on the GPU) and
returns outputs through ``Tensor.from_dlpack``.  All requests of a batch run as one call, split
back per request along the batch axis (images for rpn, RoIs for header).  Memory format and
CUDA graphs: :mod:`python_backend.torch_runtime` (model parameters ``channels_last``, ``cuda_graphs``).
With the parameter ``canvas_buckets`` (rpn only), the rpn's traces at smaller canvases
(``model_<h>x<w>.pt``) run each batch on the smallest canvas that holds it (``CanvasBuckets``).
"""
import json
import os

import torch
import triton_python_backend_utils as pb_utils

from python_backend.settings import DetectorSettings, bucket_file, parse_buckets
from python_backend.torch_runtime import CanvasBuckets, RuntimeOptions, TorchNetwork
from python_backend.triton_io import model_parameters


def _input(request, name: str, device: torch.device) -> torch.Tensor:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return torch.from_dlpack(tensor.to_dlpack()).to(device, non_blocking=True)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        gpu = args["model_instance_kind"] == "GPU"
        if gpu:
            device = torch.device("cuda", int(args["model_instance_device_id"]))
            # the trace's device is index-less "cuda": the current device
            torch.cuda.set_device(device)
            # fp32 means fp32: no TF32 in convolutions or matmuls (cudnn's default is TF32 on)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            # fixed canvas and few batch sizes: autotuned convolutions pay off after one call per shape
            torch.backends.cudnn.benchmark = True
            # The steps of the ensemble share the GPU, each in its own process: cap this one's
            # caching allocator (cudnn's autotuner otherwise grabs most of the card; seen on the H100:
            # one process holding 67 GiB and the CuPy step beside it out of memory)
            torch.cuda.set_per_process_memory_fraction(float(params.get("gpu_memory_fraction", "0.3")), device)
        else:
            device = torch.device("cpu")
        model_config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in model_config["input"]]
        self.outputs = [o["name"] for o in model_config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"])
        max_batch = int(model_config.get("max_batch_size", 0))
        options = RuntimeOptions.from_parameters(params)
        path = os.path.join(folder, params.get("torch_file", "model.pt"))
        buckets = parse_buckets(params.get("canvas_buckets", ""))
        if buckets:  # the rpn, with its traces at smaller canvases
            self.net = CanvasBuckets.load(path, {b: os.path.join(folder, bucket_file(*b)) for b in buckets}, device,
                                          max_batch, options, DetectorSettings.from_parameters(params))
        else:
            self.net = TorchNetwork(path, device, [[int(d) for d in i["dims"]] for i in model_config["input"]],
                                    max_batch, options)
        self.name, self.calls = args["model_name"], 0
        if gpu:
            self.net.warm_up()  # autotuning, graphs, then the largest call's memory kept (not more)
            self._log_allocator("after warm-up")

    def execute(self, requests):
        device = self.net.device
        feeds = [[_input(r, n, device) for r in requests] for n in self.inputs]
        counts = [t.shape[0] for t in feeds[0]]
        args = [ts[0] if len(ts) == 1 else torch.cat(ts) for ts in feeds]
        results = self.net(args)
        self.calls += 1
        if self.calls % 1000 == 0:
            self._log_allocator("while serving")
        if device.type == "cuda":
            # from_dlpack hands Triton the memory; the kernels writing it must have finished
            torch.cuda.current_stream(device).synchronize()
        responses, start = [], 0
        for c in counts:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor.from_dlpack(n, r[start:start + c].contiguous())
                for n, r in zip(self.outputs, results)]))
            start += c
        return responses

    def finalize(self):
        self._log_allocator("at unload")

    def _log_allocator(self, when: str) -> None:
        """How often the caching allocator went to the driver (cudaMalloc/cudaFree stall the GPU
        for every process under MPS): one line in the server log, read by the benchmarks."""
        device = self.net.device
        if device.type != "cuda":
            return
        stats = torch.cuda.memory_stats(device)
        print(f"{self.name}: torch allocator {when}, {self.calls} calls: {stats.get('num_device_alloc', '?')} segment "
              f"allocations, {stats.get('num_device_free', '?')} frees, {stats.get('num_alloc_retries', '?')} "
              f"retries, peak reserved {stats.get('reserved_bytes.all.peak', 0) / 2**20:.0f} MiB", flush=True)
