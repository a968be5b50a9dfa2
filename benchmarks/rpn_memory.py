"""GPU memory of the served rpn, outside Triton: where does the rpn process's memory go?

Traces the rpn for the default canvases (seeded random weights, 91 classes), loads the traces
the way the torch runner does (python_backend/torch_runtime.py ``CanvasNetworks``, the options
the exporter writes for the precision) and warms them up canvas by canvas, printing after each
stage: torch's allocated and reserved bytes, the CUDA-graph pool's share of them, and the
process's whole use of the card (``cudaMemGetInfo`` before and after, which counts the CUDA
context and cuDNN's libraries as well).  Then it serves: three rounds of every canvas at every
batch size in a shuffled order, as mixed traffic does, and prints the same columns again, with
the time per image of a batch of ``--max-batch`` on each canvas.  One configuration per process,
so that each starts clean.

    python -m benchmarks.rpn_memory [--precisions fp16,fp32] [--canvases auto] [--max-batch 8]
        [--configs fp32/1024/on/off,...]

A configuration is precision/workspace/autotuner/graphs: the cap on each cuDNN convolution's
workspace in MiB (PyTorch's ``CUDNN_CONV_WSCAP_DBG``; ``default``: the exporter's choice), cuDNN's
autotuner (``torch.backends.cudnn.benchmark``) and CUDA graphs, each ``on``, ``off`` or ``auto``
(the exporter's choice for the precision), and optionally the process's cap in GiB (the model
parameter ``gpu_memory_gib``; ``none`` or ``auto``, the exporter's).
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1 << 30


def _pool_bytes() -> tuple[int, int]:
    """(reserved bytes in CUDA-graph pools, in the default pool) from the allocator's segments."""
    graphs = default = 0
    for seg in torch.cuda.memory_snapshot():
        if seg.get("segment_pool_id", (0, 0)) != (0, 0):
            graphs += seg["total_size"]
        else:
            default += seg["total_size"]
    return graphs, default


def measure(precision: str, canvases: str, max_batch: int, autotuner: str = "auto", graphs: str = "auto",
            cap: str = "auto") -> None:
    from exporters import torch_export
    from exporters.loading import random_model, settings_from_model
    from exporters.repository import RepositoryOptions, canvas_key, python_step_config
    from python_backend import names
    from python_backend.torch_runtime import CanvasNetworks, RuntimeOptions

    dev = torch.device("cuda", torch.cuda.current_device())
    free0, total = torch.cuda.mem_get_info(dev)
    # as the torch runner sets it, unless overridden
    torch.backends.cudnn.benchmark = precision == "fp16" if autotuner == "auto" else autotuner == "on"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = random_model(num_classes=91, seed=0)
    settings = settings_from_model(model, canvases=canvases)
    tmp = Path(tempfile.mkdtemp(prefix="rpn_memory_"))
    paths = torch_export.export_torch(model, settings, tmp, device="gpu", precision=precision)
    del model
    torch.cuda.empty_cache()
    # the torch runner's options for the rpn, from the config exporters/repository.py writes for a GPU
    cfg = python_step_config(names.RPN, settings, RepositoryOptions(target="torch", device="gpu",
                                                                    torch_precision=precision))
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    if cap != "auto":
        params["gpu_memory_gib"] = cap
    if params.get("gpu_memory_gib", "none") != "none":  # as the torch runner's adapter sets it
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(params["gpu_memory_gib"]) * GIB / total), dev)
    if graphs != "auto":
        params["cuda_graphs"] = str(graphs == "on").lower()
    options = RuntimeOptions.from_parameters(params)
    rows = []
    clock = [time.perf_counter()]

    def row(stage: str) -> None:
        torch.cuda.synchronize(dev)
        graphs, default = _pool_bytes()
        free, _ = torch.cuda.mem_get_info(dev)
        now = time.perf_counter()
        rows.append((stage, torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev), graphs, default,
                     free0 - free, now - clock[0]))
        clock[0] = now

    torch.cuda.reset_peak_memory_stats(dev)
    nets = CanvasNetworks.load({c: str(paths[canvas_key(*c)]) for c in settings.canvases}, dev, max_batch, options)
    row("traces loaded")
    memory = None
    for canvas in sorted(nets.networks, key=lambda c: c[0] * c[1], reverse=True):  # as CanvasNetworks.warm_up
        net = nets.networks[canvas]
        net.warm_up(memory=memory)
        memory = net._memory
        row(f"{canvas[0]}x{canvas[1]} warmed up, graphs {sorted(net._graphs)}")
    per_image = {}
    order = [(c, b) for c in settings.canvases for b in range(1, max_batch + 1)] * 3
    random.Random(0).shuffle(order)
    for canvas, b in order:
        nets(_example(canvas, b, dev))
    row("served: 3 rounds of every canvas and batch size, shuffled")
    for canvas in settings.canvases:
        args = _example(canvas, max_batch, dev)
        nets(args)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            nets(args)
        torch.cuda.synchronize(dev)
        per_image[canvas] = (time.perf_counter() - t0) / 10 / max_batch * 1e3
    peak = torch.cuda.max_memory_reserved(dev)
    shared = (f"shared buffers: inputs {memory.inputs.nbytes / GIB:.2f} GiB, outputs {memory.outputs.nbytes / GIB:.2f} "
              "GiB" if memory else "no CUDA graphs")
    print(f"\n{torch.cuda.get_device_name(dev)}, torch {torch.__version__}: rpn {precision}, canvases "
          f"{', '.join(f'{h}x{w}' for h, w in settings.canvases)}, max batch {max_batch}; options {options}; "
          f"{shared}; cap {params.get('gpu_memory_gib', 'none')} GiB; cuDNN autotuner {torch.backends.cudnn.benchmark}; "
          f"CUDNN_CONV_WSCAP_DBG={os.environ.get('CUDNN_CONV_WSCAP_DBG', 'unset')}; "
          f"peak reserved {peak / GIB:.2f} GiB")
    print("| stage | allocated GiB | reserved GiB | graph pool GiB | default pool GiB | process on the card GiB | "
          "seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage, alloc, reserved, graphs, default, used, seconds in rows:
        print(f"| {stage} | {alloc / GIB:.2f} | {reserved / GIB:.2f} | {graphs / GIB:.2f} | {default / GIB:.2f} | "
              f"{used / GIB:.2f} | {seconds:.1f} |", flush=True)
    print(f"ms per image at batch {max_batch}: " + ", ".join(f"{h}x{w} {ms:.2f}" for (h, w), ms in per_image.items()),
          flush=True)


def _example(canvas: tuple[int, int], batch: int, dev: torch.device) -> list[torch.Tensor]:
    """A batch filling the canvas (the normal path; values do not change the work)."""
    h, w = canvas
    images = torch.rand([batch, 3, h, w], device=dev)
    sizes = torch.tensor([[h, w]] * batch, dtype=torch.float32, device=dev)
    return [images, sizes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rpn_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp16,fp32")
    ap.add_argument("--canvases", default="auto", help="as fasterrcnn export --canvases")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--configs", help="comma-separated precision/workspace/autotuner/graphs[/cap], e.g. "
                    "fp32/1024/on/off/8 (workspace: MiB or 'default'; autotuner and graphs: on, off or auto, the "
                    "exporter's choice; cap: GiB, 'none' or 'auto'); default: each of --precisions with the "
                    "exporter's choices")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one configuration
    args = ap.parse_args(argv)
    if args.one:
        measure(*args.one.split("/")[:1], args.canvases, args.max_batch, *args.one.split("/")[1:])
        return 0
    configs = args.configs.split(",") if args.configs else [f"{p}/default/auto/auto" for p in args.precisions.split(",")]
    rc = 0
    for config in configs:
        precision, workspace, autotuner, graphs, *cap = config.split("/")
        env = dict(os.environ)
        if workspace != "default":
            env["CUDNN_CONV_WSCAP_DBG"] = workspace
        print(f"\n## {config}", flush=True)
        try:
            rc |= subprocess.run([sys.executable, "-m", "benchmarks.rpn_memory", "--one",
                                  "/".join([precision, autotuner, graphs, *cap]), "--canvases", args.canvases,
                                  "--max-batch", str(args.max_batch)], env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{config}: over {args.timeout} s", flush=True)
            rc |= 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
