"""On a GPU: every builder and custom model of tests/test_builders.py served by a real
tritonserver with the torch target in fp32 (TorchScript rpn/header, CuPy roi and postprocess
steps), detections equal to torchvision's on photographs, one request at a time and together."""
from __future__ import annotations

import pytest
import torch

from evaluation.parity import assert_parity, from_packed, torchvision_detect
from evaluation.payloads import encode
from exporters.api import load_model_object
from exporters.repository import RepositoryOptions, write_repository
from python_backend import names
from test_builders import MODELS, PHOTOS

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_target_matches_torchvision_per_builder(name, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("tritonclient.grpc")
    from client import detect
    from exporters.torch_export import export_torch
    from fasterrcnn.server import ServerError, TritonServer, free_port

    model, settings = load_model_object(MODELS[name][0]())
    options = RepositoryOptions(target="torch", device="gpu", torch_precision="fp32", max_batch_size=4,
                                queue_delay_us=100_000)
    traces = export_torch(model, settings, tmp_path / "torch", device="gpu", precision="fp32")
    repo = tmp_path / "repo"
    write_repository(repo, settings, {}, options, torch_models=traces, link=True)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    try:
        server.start(timeout=300)
    except ServerError as e:
        pytest.fail(str(e))
    try:
        client = detect.connect(server.grpc_url)
        images = list(PHOTOS.values())
        refs = [torchvision_detect(model, image) for image in images]
        for concurrency in (3, 1):
            results = detect.infer_many(client, [encode(im) for im in images], concurrency=concurrency)
            for key, ref, res in zip(PHOTOS, refs, results):
                assert not isinstance(res, Exception), res
                ours = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                                names.DETECTION_LABELS, names.NUM_DETECTIONS)))
                if len(ref.scores) >= 10:
                    assert_parity(ref, ours, f"{name}: {key} on the torch target at concurrency {concurrency}")
    finally:
        server.stop()
