"""Triton model: run the rpn or header TorchScript (``model.pt``) with torch (the ``torch`` target).

Made by :mod:`exporters.torch_export`.  Loads the trace on this instance's device (its own GPU
for KIND_GPU, made current by the adapter; the CPU for KIND_CPU); inputs and outputs go through
DLPack, so GPU tensors stay on the GPU.  The requests of one ``execute`` run as one call, split
back per request along the batch axis (images for rpn, RoIs for header).  Memory format and
CUDA graphs: :mod:`python_backend.torch_runtime` (model parameters ``channels_last``, ``cuda_graphs``).
With the parameter ``torch_per_canvas`` (the rpn), the folder holds one trace per canvas of the
settings (``model_<h>x<w>.pt``), and each batch runs on its own canvas's (``CanvasNetworks``);
with ``unmasked_rpn`` also one without extent masks (``model_<h>x<w>_unmasked.pt``), run for
batches that fill their canvas.
"""
import os

import torch
import triton_python_backend_utils as pb_utils

from python_backend.settings import canvas_file, parse_flag
from python_backend.torch_runtime import CanvasNetworks, RuntimeOptions, TorchNetwork
from python_backend.triton_models.adapter import StepAdapter, rows, split


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = a = StepAdapter(args, pb_utils, arrays="torch")
        device = a.arrays.device
        if device.type == "cuda":  # (TF32 off and the memory cap: the adapter's torch arrays)
            # fp16: autotuned convolutions pay off after one call per shape.  fp32: the autotuner's
            # choices take workspaces of GiB that differ per batch size, and the CUDA graphs of
            # every batch size and canvas kept 35 GiB of them until the rpn ran out of its cap at
            # warm-up (docs/benchmarks.md, session 13); cuDNN's heuristics pick without trials
            torch.backends.cudnn.benchmark = a.params.get("precision") == "fp16"
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = RuntimeOptions.from_parameters(a.params)
        if a.params.get("torch_per_canvas") == "true":  # the rpn: a trace per canvas (and one without extent masks with unmasked_rpn)
            paths = {c: os.path.join(folder, canvas_file(*c)) for c in a.settings.canvases}
            unmasked = ({c: os.path.join(folder, canvas_file(*c, unmasked=True)) for c in a.settings.canvases}
                        if parse_flag(a.params.get("unmasked_rpn", "false")) else None)
            self.net = CanvasNetworks.load(paths, device, a.max_batch, options, unmasked)
        else:
            path = os.path.join(folder, a.params.get("torch_file", "model.pt"))
            self.net = TorchNetwork(path, device, [list(s.shape[1:]) for s in a.inputs], a.max_batch, options)
        self.calls = 0
        if device.type == "cuda":
            self.net.warm_up()  # autotuning, graphs, then the largest call's memory kept (not more)
            self._log_allocator("after warm-up")

    def execute(self, requests):
        return self.adapter.execute(requests, self._run)

    def _run(self, items):
        a = self.adapter
        args = [a.join(items, n) for n in a.input_names]
        sizes = a.check_values(dict(zip(a.input_names, args)))
        if isinstance(self.net, CanvasNetworks):  # the rpn: the host sizes may choose its unmasked trace
            results = self.net(args, sizes)
        else:
            results = self.net(args)
        self.calls += 1
        if self.calls % 1000 == 0:
            self._log_allocator("while serving")
        return split(results, rows(items, a.input_names[0]))

    def finalize(self):
        self._log_allocator("at unload")

    def _log_allocator(self, when: str) -> None:
        """How often the caching allocator went to the driver (cudaMalloc/cudaFree stall the GPU
        for every process under MPS): one line in the server log, read by the benchmarks."""
        device = self.net.device
        if device.type != "cuda":
            return
        stats = torch.cuda.memory_stats(device)
        print(f"{self.adapter.name}: torch allocator {when}, {self.calls} calls: "
              f"{stats.get('num_device_alloc', '?')} segment allocations, {stats.get('num_device_free', '?')} frees, "
              f"{stats.get('num_alloc_retries', '?')} retries, peak reserved "
              f"{stats.get('reserved_bytes.all.peak', 0) / 2**20:.0f} MiB", flush=True)
