"""One TensorRT plan per GPU model (exporters/tensorrt/gpus.py).

Triton picks a plan per instance by its GPU's compute capability only (``cc_model_filenames``), so
two GPU models of one compute capability can't each get their own plan in one repository: the
planner refuses them and says how to serve them instead, rather than loading one model's plan on
the other.  TensorRT is not needed: these are the pure planning and config functions.
"""
from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from exporters.tensorrt import cache, gpus
from exporters.tensorrt.gpus import GpuInfo, PlanTarget

A100 = GpuInfo(0, "NVIDIA A100-SXM4-80GB", "8.0")
A30 = GpuInfo(2, "NVIDIA A30", "8.0")
H100 = GpuInfo(1, "NVIDIA H100 80GB HBM3", "9.0")


def test_two_models_of_one_compute_capability_are_refused():
    with pytest.raises(gpus.SharedComputeCapability) as raised:
        gpus.plan_targets([A100, H100, A30])
    message = str(raised.value)
    for part in ("compute capability 8.0", f"{A100.name}: GPUs 0", f"{A30.name}: GPUs 2", "cc_model_filenames",
                 "GPUS"):
        assert part in message, part
    assert isinstance(raised.value, ValueError)  # what the CLIs report as a bad setting


def test_each_gpu_model_gets_its_own_plan_built_on_its_own_gpu():
    """Serving the A100s alone, or the A30 alone, each gets a plan built on a GPU of that model."""
    a100s = gpus.plan_targets([GpuInfo(3, A100.name, "8.0"), A100])
    assert a100s == [PlanTarget("8.0", 0, (A100.name,), gpus.PLAN_FILE)]
    assert gpus.plan_targets([A30]) == [PlanTarget("8.0", 2, (A30.name,), gpus.PLAN_FILE)]
    # and they never share a cached repository: the key names the model, not only the compute capability
    assert cache.gpus_slug([A100]) != cache.gpus_slug([A30])


def test_a_config_maps_each_compute_capability_to_one_models_plan():
    targets = gpus.plan_targets([A30, H100])
    assert [(t.gpu_names, t.filename) for t in targets] == [((H100.name,), "model_cc9.0.plan"),
                                                           ((A30.name,), "model_cc8.0.plan")]
    cfg = mc.ModelConfig(name="rpn", platform="tensorrt_plan")
    gpus.set_cc_model_filenames(cfg, targets)
    parsed = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert dict(parsed.cc_model_filenames) == {"8.0": "model_cc8.0.plan", "9.0": "model_cc9.0.plan"}
