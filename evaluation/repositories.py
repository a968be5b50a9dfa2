"""Model repositories for a benchmark run: the ensemble (torch target) and the torchvision baseline.

    write_benchmark_repositories(work, weights, canvas=(800, 1344), device="gpu")
      -> {"fp32": work/repo_fp32, "fp16": work/repo_fp16}

``repo_fp32``: the ``fasterrcnn`` ensemble with fp32 TorchScript rpn/header, plus the baselines
``baseline_fp32`` and ``baseline_fp16`` (torchvision eager, fp32 and autocast float16;
``evaluation/baseline/model.py``).  ``repo_fp16``: the ensemble with fp16 rpn/header.  Model names
are the same in both ensembles, so each repository gets its own server.  Both are written by the
project's own CLI (``python -m exporters export --target torch``) from one state_dict file, which
the baselines load too.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from python_backend import names
from python_backend.settings import DetectorSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the repository root: where ``python -m exporters`` runs
BASELINE_MODEL = Path(__file__).resolve().parent / "baseline" / "model.py"
BASELINES = {"baseline_fp32": "fp32", "baseline_fp16": "fp16"}
WEIGHTS_FILE = "weights.pt"


def save_random_weights(path: Path, num_classes: int = 91, seed: int = 0) -> Path:
    """Seeded random fasterrcnn_resnet50_fpn weights as a state_dict (no download needed)."""
    import torch

    from exporters.loading import random_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_model(num_classes, seed=seed).state_dict(), path)
    return path


def baseline_config(name: str, settings: DetectorSettings, precision: str, max_batch_size: int = 8,
                    queue_delay_us: int = 0, device: str = "gpu", raw: bool = False) -> mc.ModelConfig:
    """Same input and outputs as the ``fasterrcnn`` ensemble (``raw``: as ``fasterrcnn_raw``, decoded
    UINT8 HWC images); python backend, one instance on the GPU (``device="cpu"``: KIND_CPU, only to
    try the plumbing without a GPU)."""
    d = settings.box_detections_per_img
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    if raw:
        cfg.input.add(name=names.IMAGE_RAW, data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    else:
        cfg.input.add(name=names.IMAGE_BYTES, data_type=mc.TYPE_STRING, dims=[1])
    for n, dtype, dims in ((names.DETECTION_BOXES, mc.TYPE_FP32, [d, 4]), (names.DETECTION_SCORES, mc.TYPE_FP32, [d]),
                           (names.DETECTION_LABELS, mc.TYPE_INT32, [d]), (names.NUM_DETECTIONS, mc.TYPE_INT32, [1])):
        cfg.output.add(name=n, data_type=dtype, dims=dims)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=1, kind=kind)
    params = settings.to_parameters()
    params.update(precision=precision, weights_file=WEIGHTS_FILE)
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def write_baselines(repo: Path, settings: DetectorSettings, weights: Path, max_batch_size: int = 8,
                    device: str = "gpu", raw: bool = False) -> list[str]:
    """Add ``baseline_fp32`` and ``baseline_fp16`` model folders to ``repo``."""
    written = []
    for name, precision in BASELINES.items():
        folder = Path(repo) / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        cfg = baseline_config(name, settings, precision, max_batch_size, device=device, raw=raw)
        (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        shutil.copy(BASELINE_MODEL, folder / "1" / "model.py")
        shutil.copy(weights, folder / "1" / WEIGHTS_FILE)
        written.append(name)
    return written


def export_ensemble(repo: Path, weights: Path, precision: str, canvas: tuple[int, int] = (800, 1344),
                    device: str = "gpu", max_batch_size: int = 8, python: str = sys.executable,
                    instances: int = 1, queue_delay_us: int = 0, extra_args: tuple[str, ...] = ()) -> Path:
    """``python -m exporters export --target torch`` into ``repo`` (a subprocess: the CLI as users run it);
    ``extra_args`` go to the CLI as they are (``--no-cuda-graphs``, say)."""
    cmd = [python, "-m", "exporters", "export", "--weights", str(weights), "--target", "torch",
           "--device", device, "--precision", precision, "--canvas", f"{canvas[0]}x{canvas[1]}",
           "--max-batch-size", str(max_batch_size), "--repository", str(repo),
           "--instances", str(instances), "--queue-delay-us", str(queue_delay_us), *extra_args]
    log.info("%s", " ".join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export ({precision}) failed with code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Path(repo)


def write_benchmark_repositories(work: Path, weights: Path | None = None, canvas: tuple[int, int] = (800, 1344),
                                 device: str = "gpu", max_batch_size: int = 8,
                                 precisions: tuple[str, ...] = ("fp32", "fp16"), raw: bool = False,
                                 instances: int = 1, queue_delay_us: int = 0,
                                 extra_args: tuple[str, ...] = (), baselines: bool = True) -> dict[str, Path]:
    """Write ``work/repo_fp32`` (ensemble fp32 + both baselines) and ``work/repo_fp16`` (ensemble fp16).

    ``weights``: a state_dict; None saves seeded random weights to ``work/weights.pt``.  ``raw``: the
    baselines take decoded images (``image_raw``) instead of encoded ones.  ``baselines=False``: only
    the ``precisions`` asked for, no baselines.
    """
    from exporters.loading import checkpoint_model, settings_from_model

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = save_random_weights(work / WEIGHTS_FILE)
    repos = {}
    for precision in dict.fromkeys((*(("fp32",) if baselines else ()), *precisions)):  # fp32 holds the baselines
        repos[precision] = export_ensemble(work / f"repo_{precision}", weights, precision, canvas, device,
                                           max_batch_size, instances=instances, queue_delay_us=queue_delay_us,
                                           extra_args=extra_args)
    if baselines:
        settings = settings_from_model(checkpoint_model(weights), canvas)
        write_baselines(repos["fp32"], settings, weights, max_batch_size, device, raw)
    return repos
