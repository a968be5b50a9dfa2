"""Run an exported TorchScript network (rpn or header) the way the ``torch`` target serves it.

Triton-free: :mod:`python_backend.triton_models.torch_runner` is a thin adapter over
:class:`TorchNetwork`, and the GPU tests drive this class directly.

Three run-time options, all off by default and set per model by the exporter (the torch target
turns all three on for the fp16 rpn on a GPU; fp32 runs with none: exporters/repository.py says why):

* ``channels_last``: weights and the 4-D input in channels-last memory format.  cuDNN's fp16
  convolutions on Hopper are NHWC kernels; with NCHW tensors every convolution pays a layout
  transform (docs/benchmarks.md has the dense part's times in both layouts).  The results are the
  same computation (different cuDNN algorithms, so not bit-identical).
* ``optimize_for_inference`` (GPU only): ``torch.jit.freeze`` then ``torch.jit.optimize_for_inference``:
  cuDNN's fused convolution + bias + ReLU (+ residual add) instead of one element-wise kernel
  each (docs/benchmarks.md has the times with and without).  Numerics: fused, a convolution's
  output is rounded to float16 once instead of after each of convolution, bias and ReLU; a GPU
  test holds it at least as close to fp32 as the plain fp16 trace.
* ``cuda_graphs``: CUDA graphs for every batch size (:meth:`TorchNetwork.batch_sizes`), captured
  at warm-up into memory they share (:class:`GraphMemory`) and replayed; it removes
  the CPU cost of launching a few hundred kernels per call, which is most of a batch-1 call's
  time when several processes share the GPU.  Only for inputs whose batch is bounded and whose
  other dimensions are fixed (the rpn: one trace per canvas, each on its own canvas).  The
  header's batch is a RoI count that changes every call, so it runs without graphs.

:class:`CanvasNetworks` holds the rpn's trace of each canvas and runs each batch on its own
canvas's (a trace has fixed map sizes; exporters/torch_export.py).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from python_backend.settings import fills_canvas, parse_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    channels_last: bool = False
    cuda_graphs: bool = False
    optimize_for_inference: bool = False

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "RuntimeOptions":
        """From the model-config parameters named as the fields ("true"/"false"; absent: false)."""
        try:
            return cls(**{f.name: parse_flag(params.get(f.name, "false")) for f in dataclasses.fields(cls)})
        except ValueError as e:
            raise ValueError(f"torch runner parameters: {e}") from None


class TorchNetwork:
    """A TorchScript module on one device, called with a batch of inputs, returning a tuple of outputs.

    Args:
        path: the ``model.pt`` trace.
        device: where it runs; the trace must have been made for that device type.
        input_dims: per input, its dims without the batch axis (from the model config).
        max_batch: largest batch the dynamic batcher forms (0: the model does not batch).
        options: :class:`RuntimeOptions`.
    """

    def __init__(self, path: str, device: torch.device, input_dims: list[list[int]], max_batch: int,
                 options: RuntimeOptions = RuntimeOptions()):
        self.device = torch.device(device)
        self.options = options
        self.input_dims = [list(d) for d in input_dims]
        self.max_batch = int(max_batch)
        if options.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a GPU instance")
        if options.optimize_for_inference and self.device.type != "cuda":
            raise ValueError("optimize_for_inference is for GPU instances (on the CPU it switches to MKL-DNN ops)")
        if options.cuda_graphs and not 0 < self.max_batch <= 64:
            raise ValueError(f"cuda_graphs needs a bounded batch (max_batch_size 1..64), got {self.max_batch}")
        self.module = torch.jit.load(path, map_location=self.device).eval()
        if options.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        if options.optimize_for_inference:
            # frozen weights, then cuDNN's fused convolution + bias (+ residual add) + ReLU where the
            # pattern allows; the separate bias-add, ReLU and add kernels were 60% of the fp16 rpn's
            # kernel time on the H100 (benchmarks/bench_dense.py --profile-only)
            self.module = torch.jit.optimize_for_inference(torch.jit.freeze(self.module))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self._memory: GraphMemory | None = None

    # --- plain calls -------------------------------------------------------------------------------

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _eager(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # The plain interpreter: no profiling runs, no fusion and no re-specialization per new
        # batch size (header batches are RoI counts, a new size nearly every call); numerics
        # stay those of the eager modules.
        with torch.no_grad(), torch.jit.optimized_execution(False):
            out = self.module(*(self._layout(a) for a in args))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def __call__(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Outputs for one batch.  With graphs, outputs are fresh tensors (copies of the graph's
        static outputs), so they stay valid after the next call."""
        out, static = self.run(args)
        return tuple(o.clone() for o in out) if static else out

    def run(self, args: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(outputs, static): with a graph for this batch size, its static outputs, which the next
        replay of any graph sharing its memory overwrites (copy what must outlive it); else fresh
        outputs of an eager call."""
        captured = self._graphs.get(int(args[0].shape[0]))
        if captured is not None:
            graph, static_in, static_out = captured
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            graph.replay()
            return static_out, True
        return self._eager(args), False

    # --- warm-up and capture ----------------------------------------------------------------------

    def batch_sizes(self) -> list[int]:
        """The batch sizes warmed up (and with CUDA graphs, captured): every batch size the dynamic
        batcher can form (graphs share their memory, :class:`GraphMemory`, so one per batch size
        costs little, and no batch pays for a larger one's rows), or a few RoI counts for the header."""
        if self.max_batch <= 0:
            return [1]
        if self.max_batch <= 64:
            return list(range(1, self.max_batch + 1))
        return [1, self.max_batch // 8, self.max_batch]

    def warm_up(self, example=None, memory: "GraphMemory | None" = None) -> None:
        """One call per batch size, so that cuDNN's autotuning happens at load rather than in the
        first requests; with ``cuda_graphs``, then one graph per batch size.

        On a GPU it ends by handing the autotuner's workspaces back (``empty_cache``: the steps
        of the ensemble share the card, and cuDNN's trials otherwise leave tens of GiB cached in
        this process; seen on the H100) and then making one call at the largest batch, so that
        the caching allocator keeps the blocks of the largest call.  Serving then reuses those
        blocks instead of growing the process: without that last call the header (whose batch
        is a RoI count, different every call) grew by 624 MiB over a 5-minute soak, in steps, as
        ever larger batches first arrived (docs/benchmarks.md).

        ``example(batch)`` gives inputs of a batch (default: ones, valid image sizes and boxes,
        so the call takes the normal path).  ``memory``: the :class:`GraphMemory` to capture with,
        shared with other networks whose graphs are never replayed at once (default: a new one).
        """
        make = example or (lambda b: [torch.ones([b, *d], device=self.device) for d in self.input_dims])
        largest = None
        for b in self.batch_sizes():
            largest = self._eager(make(b))
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        if self.options.cuda_graphs:
            self._memory = memory if memory is not None else GraphMemory(self.device)
            self._memory.inputs.reserve([self._layout(a) for a in make(max(self.batch_sizes()))])
            self._memory.outputs.reserve(largest)
            del largest
            # largest first: the shared pool is sized by it, the smaller graphs reuse its blocks
            for b in sorted(self.batch_sizes(), reverse=True):
                self._capture(b, make(b))
            log.info("captured CUDA graphs for batch sizes %s", sorted(self._graphs))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self(make(max(self.batch_sizes())))
        torch.cuda.synchronize(self.device)

    def _capture(self, batch: int, args: list[torch.Tensor]) -> None:
        memory = self._memory
        static_in = memory.inputs.write([self._layout(a) for a in args])
        graph = torch.cuda.CUDAGraph()
        stream = memory.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._eager(static_in)  # one run on the side stream before capture, as torch advises
            with torch.no_grad(), torch.jit.optimized_execution(False), torch.cuda.graph(graph, pool=memory.pool,
                                                                                           stream=stream):
                out = self.module(*static_in)
                out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                # the graph's last kernels copy its outputs into the shared buffers; what the
                # network allocated (outputs included) is then free at the end of the capture, and
                # the next capture in the pool reuses it
                static_out = memory.outputs.write(out)
                del out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graphs[batch] = (graph, static_in, static_out)


class GraphMemory:
    """What the CUDA graphs of networks that are never replayed at once share (every batch size
    and canvas of the rpn; one instance replays one graph at a time):

    * one memory pool, so that a capture reuses the blocks earlier captures freed;
    * one capture stream: the caching allocator hands a freed block only to allocations on the
      stream it was made on, so with a new stream per capture no capture reused another's blocks
      and the pool grew by a whole network's temporaries per canvas (``benchmarks.rpn_memory``;
      docs/benchmarks.md has both measurements);
    * the buffers of their inputs and outputs (:class:`SharedBuffers`), else each graph's own.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)
        self.inputs = SharedBuffers(self.device)
        self.outputs = SharedBuffers(self.device)


class SharedBuffers:
    """One buffer per tensor position, large enough for the largest tensor it held, shared by
    graphs that are never replayed at once; :meth:`write` views a buffer in each tensor's shape,
    dtype and memory format (channels last stays channels last).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.buffers: list[torch.Tensor] = []

    def reserve(self, tensors) -> None:
        """Room for ``tensors`` (those of the largest batch a graph will be captured for); call
        before capturing, outside the capture."""
        for i, t in enumerate(tensors):
            if i == len(self.buffers):
                self.buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
            if self.buffers[i].numel() < _nbytes(t):
                self.buffers[i] = torch.empty(_nbytes(t), dtype=torch.uint8, device=self.device)

    def write(self, tensors) -> tuple[torch.Tensor, ...]:
        """``tensors`` copied into the buffers; the copies (views of the buffers) are returned."""
        if len(tensors) > len(self.buffers):
            raise ValueError(f"{len(tensors)} tensors, but buffers were reserved for {len(self.buffers)}")
        copies = []
        for buf, t in zip(self.buffers, tensors):
            if _nbytes(t) > buf.numel():
                raise ValueError(f"a tensor of {tuple(t.shape)} {t.dtype} ({_nbytes(t)} bytes) does not fit its "
                                 f"buffer of {buf.numel()} bytes; reserve the largest tensors first")
            flat = buf[:_nbytes(t)].view(t.dtype)
            dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            view = flat.as_strided(t.shape, t.stride()) if dense else flat.view(t.shape)
            view.copy_(t)
            copies.append(view)
        return tuple(copies)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CanvasNetworks:
    """The rpn, one trace per canvas: each batch runs on the trace of its own canvas.

    Preprocess pads each request onto the smallest of the settings' canvases that holds it, and
    Triton's dynamic batcher joins only requests of equal shapes, so a batch's images
    ``[B, 3, H, W]`` are on one canvas; (H, W) selects that canvas's trace exactly, and its outputs
    have that canvas's shapes (nothing is cropped or padded here).

    Args:
        networks: {(height, width): the rpn traced on that canvas}.
        unmasked: {(height, width): the rpn without extent masks on that canvas} (none, or every
            canvas of ``networks``): run instead for a batch that fills its canvas
            (:func:`~python_backend.settings.fills_canvas`), where it gives the same bits.
    """

    def __init__(self, networks: dict[tuple[int, int], TorchNetwork],
                 unmasked: dict[tuple[int, int], TorchNetwork] | None = None):
        if not networks:
            raise ValueError("expected a network for at least one canvas, got none")
        self.networks = dict(networks)
        self.unmasked = dict(unmasked or {})
        if self.unmasked and set(self.unmasked) != set(self.networks):
            raise ValueError(f"unmasked rpn traces for the canvases {sorted(self.unmasked)}, expected every canvas "
                             f"{sorted(self.networks)}")
        self.device = next(iter(self.networks.values())).device
        self.calls: dict[tuple[int, int], int] = {}  # canvas -> calls run on it
        self.unmasked_calls: dict[tuple[int, int], int] = {}  # canvas -> of those, calls on its unmasked trace

    @classmethod
    def load(cls, paths: dict[tuple[int, int], str], device: torch.device, max_batch: int,
             options: RuntimeOptions, unmasked_paths: dict[tuple[int, int], str] | None = None) -> "CanvasNetworks":
        """The rpn's traces ({(height, width): path}, and the unmasked ones where given) as
        :class:`TorchNetwork` objects on ``device``."""
        def load_all(files):
            return {(h, w): TorchNetwork(str(path), device, [[3, h, w], [2]], max_batch, options)
                    for (h, w), path in (files or {}).items()}

        return cls(load_all(paths), load_all(unmasked_paths))

    def __call__(self, args: list[torch.Tensor], image_sizes=None) -> tuple[torch.Tensor, ...]:
        """``image_sizes``: the batch's sizes on the host (read already to check them), which
        choose the unmasked trace where there is one and the batch fills its canvas."""
        canvas = tuple(int(d) for d in args[0].shape[-2:])
        net = self.networks.get(canvas)
        if net is None:
            raise ValueError(f"images on a {canvas[0]}x{canvas[1]} canvas (height x width); this rpn is traced for "
                             f"{', '.join(f'{h}x{w}' for h, w in self.networks)}")
        self.calls[canvas] = self.calls.get(canvas, 0) + 1
        if self.unmasked and image_sizes is not None and fills_canvas(image_sizes, canvas):
            self.unmasked_calls[canvas] = self.unmasked_calls.get(canvas, 0) + 1
            net = self.unmasked[canvas]
        return net(args)

    def warm_up(self) -> None:
        """Each canvas's warm-up (its unmasked trace's after it), the largest (by area) first; on a
        GPU with CUDA graphs, every graph shares one :class:`GraphMemory`, which the largest
        canvas's capture sized (one instance runs one call at a time)."""
        order = sorted(self.networks, key=lambda c: c[0] * c[1], reverse=True)
        memory = None
        for canvas in order:
            for net in (self.networks[canvas], self.unmasked.get(canvas)):
                if net is not None:
                    net.warm_up(memory=memory)
                    memory = net._memory
