"""Model repositories for a benchmark run: the ensemble (torch target) and the torchvision baseline.

    export_ensemble(work / "repo_fp16", weights, "fp16")      # the project's CLI, default settings
    write_baseline_repository(work / "repo_baseline", weights, settings, ["fp16"], variants)

The ensemble is written by the project's own CLI (``python -m fasterrcnn export --target torch``)
with its default settings (canvases, buckets, instances, batching), as a user would serve it; only
the precision, the device and the weights are chosen.  One repository per precision, since model
names are the same in each, so each gets its own server.  The baseline repository holds torchvision
run eagerly (``evaluation/baseline/model.py``) once per precision and serving variant
(:class:`ServingVariant`: instances, max batch size, queue delay), all from the same state_dict.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from exporters.repository import RepositoryOptions
from python_backend import names
from python_backend.settings import DetectorSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the repository root: where ``python -m fasterrcnn`` runs
BASELINE_MODEL = Path(__file__).resolve().parent / "baseline" / "model.py"
WEIGHTS_FILE = "weights.pt"
BASELINE_PRECISIONS = ("fp32", "fp16")  # evaluation.baseline.eager.PRECISIONS
# The caching allocator's cap of a served baseline process, and of torchvision eager's capped rows:
# what the ensemble's torch processes (rpn and header) may take together.  Under a cap cuDNN's
# float32 plans change, so the baselines get the ensemble's knob
BASELINE_MEMORY_GIB = RepositoryOptions().torch_rpn_memory_gib + RepositoryOptions().torch_header_memory_gib


@dataclass(frozen=True)
class ServingVariant:
    """How Triton serves a baseline: instances (processes, on the one GPU), the dynamic batcher's
    largest batch and its queue delay.  Written ``i2b16d500`` (:meth:`parse`, :attr:`key`)."""

    instances: int = 1
    max_batch_size: int = 8
    queue_delay_us: int = 0

    def __post_init__(self) -> None:
        if self.instances < 1 or self.max_batch_size < 1 or self.queue_delay_us < 0:
            raise ValueError(f"a serving variant needs instances >= 1, max batch size >= 1 and queue delay >= 0, "
                             f"got {self}")

    @property
    def key(self) -> str:
        return f"i{self.instances}b{self.max_batch_size}d{self.queue_delay_us}"

    @classmethod
    def parse(cls, text: str) -> "ServingVariant":
        """``"i2b16"`` or ``"i2b16d2000"``: 2 instances, max batch 16, queue delay 2000 us (default 0)."""
        m = re.fullmatch(r"i(\d+)b(\d+)(?:d(\d+))?", text.strip())
        if not m:
            raise ValueError(f"a serving variant is written i<instances>b<max batch>[d<queue delay us>], such as "
                             f"i2b16d2000, got {text!r}")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0))


def parse_variants(text: str) -> list[ServingVariant]:
    """A comma-separated list of :meth:`ServingVariant.parse` texts."""
    variants = [ServingVariant.parse(t) for t in text.split(",") if t.strip()]
    if not variants:
        raise ValueError(f"expected at least one serving variant such as i1b8,i2b16d2000, got {text!r}")
    return variants


def baseline_name(precision: str, variant: ServingVariant) -> str:
    return f"baseline_{precision}_{variant.key}"


def save_random_weights(path: Path, num_classes: int = 91, seed: int = 0) -> Path:
    """Seeded random fasterrcnn_resnet50_fpn weights as a state_dict (no download needed)."""
    import torch

    from exporters.loading import random_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_model(num_classes, seed=seed).state_dict(), path)
    return path


def baseline_config(name: str, settings: DetectorSettings, precision: str,
                    variant: ServingVariant = ServingVariant(), device: str = "gpu", raw: bool = True,
                    encoded_input: tuple[int, list[int]] = (mc.TYPE_UINT8, [-1])) -> mc.ModelConfig:
    """Same outputs as the ``fasterrcnn`` ensembles; input as ``fasterrcnn_raw`` (``raw``: decoded
    UINT8 HWC images) or as ``fasterrcnn`` (``encoded_input``: its data type and dims, encoded bytes of
    one image per request by default); python backend, ``variant``'s instances on the GPU
    (``device="cpu"``: KIND_CPU, only to try the plumbing without a GPU)."""
    d = settings.box_detections_per_img
    if precision not in BASELINE_PRECISIONS:
        raise ValueError(f"baseline precision must be one of {BASELINE_PRECISIONS}, got {precision!r}")
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=variant.max_batch_size)
    if raw:
        cfg.input.add(name=names.IMAGE_RAW, data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    else:
        cfg.input.add(name=names.IMAGE_BYTES, data_type=encoded_input[0], dims=list(encoded_input[1]))
    for n, dtype, dims in ((names.DETECTION_BOXES, mc.TYPE_FP32, [d, 4]), (names.DETECTION_SCORES, mc.TYPE_FP32, [d]),
                           (names.DETECTION_LABELS, mc.TYPE_INT32, [d]), (names.NUM_DETECTIONS, mc.TYPE_INT32, [1])):
        cfg.output.add(name=n, data_type=dtype, dims=dims)
    cfg.dynamic_batching.max_queue_delay_microseconds = variant.queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=variant.instances, kind=kind)
    params = settings.to_parameters()
    params.update(precision=precision, weights_file=WEIGHTS_FILE, gpu_memory_gib=f"{BASELINE_MEMORY_GIB:g}")
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def write_baseline_repository(repo: Path, weights: Path, settings: DetectorSettings, precisions,
                              variants: list[ServingVariant], device: str = "gpu") -> list[str]:
    """A repository (emptied first) of one baseline model per precision and variant
    (:func:`baseline_name`), each taking decoded images like ``fasterrcnn_raw``; their names."""
    repo = Path(repo)
    if repo.exists():
        shutil.rmtree(repo)
    written = []
    for precision in precisions:
        for variant in variants:
            name = baseline_name(precision, variant)
            (repo / name / "1").mkdir(parents=True)
            cfg = baseline_config(name, settings, precision, variant, device=device)
            (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
            shutil.copy(BASELINE_MODEL, repo / name / "1" / "model.py")
            shutil.copy(weights, repo / name / "1" / WEIGHTS_FILE)
            written.append(name)
    return written


def export_ensemble(repo: Path, weights: Path, precision: str, device: str = "gpu", python: str = sys.executable,
                    extra_args: tuple[str, ...] = ()) -> Path:
    """``python -m fasterrcnn export --target torch`` into ``repo`` (a subprocess: the CLI as users run
    it), every setting but the precision, device and weights left at its default; ``extra_args`` go
    to the CLI as they are (``--no-cuda-graphs``, ``--instances 2``).  Raises RuntimeError with the
    CLI's last words when it fails (a precision it refuses, say)."""
    cmd = [python, "-m", "fasterrcnn", "export", "--weights", str(weights), "--target", "torch",
           "--device", device, "--precision", precision, "--repository", str(repo), *extra_args]
    log.info("%s", " ".join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export ({precision}) failed with code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Path(repo)


def exported_settings(repo: Path) -> DetectorSettings:
    """The settings an exported repository serves with (its preprocess step's parameters)."""
    from exporters.repository import read_config

    cfg = read_config(Path(repo) / names.PREPROCESS_RAW / "config.pbtxt")
    return DetectorSettings.from_parameters({k: v.string_value for k, v in cfg.parameters.items()})


def encoded_input_type(repo: Path) -> str:
    """The data type of the ``fasterrcnn`` ensemble's encoded-image input, as Triton names it
    (``TYPE_UINT8``, or ``TYPE_STRING`` in repositories of older exports)."""
    from exporters.repository import read_config

    cfg = read_config(Path(repo) / names.ENSEMBLE / "config.pbtxt")
    (image,) = [i for i in cfg.input if i.name == names.IMAGE_BYTES]
    return mc.DataType.Name(image.data_type)
