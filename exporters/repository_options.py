"""What the repository writer is asked for: :class:`RepositoryOptions` and the values its fields take.

``exporters.repository`` writes a repository from these; ``fasterrcnn.options`` turns the command
line's flags into them.
"""
from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("python", "onnxruntime", "tensorrt", "torch")
DEVICES = ("cpu", "gpu")
TRT_PRECISIONS = ("fp32", "fp16")
# TensorRT's own builder (the tensorrt target) also offers tf32, its default for fp32 networks
ENGINE_PRECISIONS = ("fp32", "tf32", "fp16")
JPEG_DECODERS = ("pillow", "gpu")  # preprocess on GPU instances: Pillow, or nvJPEG (torchvision.io.decode_jpeg)


@dataclass(frozen=True)
class RepositoryOptions:
    target: str = "python"
    device: str = "cpu"  # where python-backend steps run (KIND_CPU / KIND_GPU)
    max_batch_size: int = 8  # images per batch
    instances: int = 1
    # 0: automatic (rpn_count, postprocess_count; docs/benchmarks.md, session 18, has the A/B).  The rpn
    # gets its own count; postprocess is the one step without a batcher (each request carries its own
    # number of RoIs), so more instances are its only way to take requests side by side
    postprocess_instances: int = 0
    rpn_instances: int = 0
    queue_delay_us: int = 0  # dynamic batcher max_queue_delay_microseconds (Triton's default; see docs/benchmarks.md)
    # GPU ids (CUDA ordinals) every KIND_GPU instance group is placed on: ``instance_group { gpus: [...] }``,
    # with ``count`` instances on each of them.  Empty: no list, which Triton reads as ``count``
    # instances on every GPU the server sees (Triton's model_configuration.md, "Instance Groups").
    gpus: tuple[int, ...] = ()
    # onnxruntime target only: run the networks through ONNX Runtime's TensorRT execution
    # provider (Triton's gpu_execution_accelerator "tensorrt"), with these settings.
    ort_tensorrt: bool = False
    # TensorRT's settings, for the tensorrt target's engines (exporters.export builds them with these)
    # and for ONNX Runtime's TensorRT execution provider (precision_mode, max_workspace_size_bytes)
    trt_precision: str = "fp16"  # fp32 | fp16, and tf32 for the tensorrt target
    trt_workspace_bytes: int = 1 << 30
    ort_trt_cache_dir: str = ""  # trt_engine_cache_path; empty: ONNX Runtime rebuilds at every load
    # torch target only: precision of the TorchScript traces (written as a parameter): fp32 and
    # tf32 share float32 traces, and the runner turns TF32 on for tf32 only
    torch_precision: str = "fp32"
    # torch target, rpn only (python_backend/torch_runtime.py): channels-last weights and input
    # (fp16 only), one CUDA graph per batch size (GPU instances only), and cuDNN's fused
    # convolution + bias + ReLU from torch.jit.optimize_for_inference (fp16 on GPU instances only)
    torch_channels_last: bool = True
    torch_cuda_graphs: bool = True
    torch_optimize_for_inference: bool = True
    # torch target on GPU instances: the caching allocator's cap per process in GiB (model parameter
    # gpu_memory_gib).  cuDNN's float32 heuristics otherwise pick plans with workspaces of tens
    # of GiB, and the allocator keeps them; under the cap a plan whose workspace does not fit is
    # passed over for the next (docs/benchmarks.md, session 14, has the fp32 rpn's memory and speed
    # without a cap and under 8 GiB).  The header's batch is RoIs, its work small
    torch_rpn_memory_gib: float = 8.0
    torch_header_memory_gib: float = 4.0
    # torch target: a second rpn trace per canvas without the extent masks, run for batches whose
    # every image's padded extent is the canvas (then the masks are all ones: same bits, fewer
    # passes); model parameter unmasked_rpn.  On: 12% more images/s served in fp16 on an H200
    # (docs/benchmarks.md, session 16) for 0.6 GiB more GPU memory
    torch_unmasked_rpn: bool = True
    # GPU preprocess instances: decode JPEG requests with Pillow (libjpeg-turbo: the pixels torchvision
    # users decode, so the detections are theirs) or, opt-in, nvJPEG ("gpu": other pixels, other
    # detections; README, "Model card"); CPU instances always use Pillow.  Preprocess's parameter jpeg_decoder
    jpeg_decoder: str = "pillow"
    # threads that decode one execute's requests side by side in each preprocess instance (parameter
    # decode_threads); 0: one per CPU of the serving machine, at most 8
    decode_threads: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.instances < 1 or self.postprocess_instances < 0 or self.rpn_instances < 0:
            raise ValueError(f"instances must be >= 1, postprocess_instances and rpn_instances >= 0, got "
                             f"{self.instances}, {self.postprocess_instances} and {self.rpn_instances}")
        if not 1 <= self.max_batch_size <= 64:
            raise ValueError(f"max_batch_size must be in 1..64, got {self.max_batch_size}")
        if self.ort_tensorrt and self.target != "onnxruntime":
            raise ValueError(f"ort_tensorrt applies to the onnxruntime target only, got target {self.target!r}")
        allowed = ENGINE_PRECISIONS if self.target == "tensorrt" else TRT_PRECISIONS
        if self.trt_precision not in allowed:
            raise ValueError(f"trt_precision must be one of {allowed}, got {self.trt_precision!r}")
        if self.torch_precision not in ENGINE_PRECISIONS:
            raise ValueError(f"torch_precision must be one of {ENGINE_PRECISIONS}, got {self.torch_precision!r}")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {JPEG_DECODERS}, got {self.jpeg_decoder!r}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0: one per CPU), got {self.decode_threads}")
        if not (self.torch_rpn_memory_gib > 0 and self.torch_header_memory_gib > 0):
            raise ValueError(f"torch memory caps must be positive GiB, got rpn {self.torch_rpn_memory_gib} and header "
                             f"{self.torch_header_memory_gib}")
        if self.trt_workspace_bytes < 1:
            raise ValueError(f"trt_workspace_bytes must be positive, got {self.trt_workspace_bytes}")
        if len(set(self.gpus)) != len(self.gpus) or any(not isinstance(g, int) or g < 0 for g in self.gpus):
            raise ValueError(f"gpus must be distinct GPU ids >= 0, got {self.gpus!r}")
        if self.gpus and self.device == "cpu" and self.target in ("python", "torch"):
            raise ValueError(f"gpus {list(self.gpus)} place GPU instances, but with device 'cpu' and target "
                             f"{self.target!r} every step runs on the CPU")
