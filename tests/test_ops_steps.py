"""The backend interface and the roi step written once over it (:mod:`python_backend.steps`):
every backend's roi step against torchvision, the fast path's against the NumPy reference on
8 images x 4390 proposals, and the GPU warm-up that sizes CuPy's memory pool."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from op_cases import (  # noqa: F401  (backend, gpu_backend: fixtures)
    ATOL, CANVAS, COCO_SETTINGS, backend, canvas_features, gpu_backend, host, image_sizes_for, realistic_proposals,
    reference, tv_multiscale,
)
from python_backend import backends
from python_backend.reference import ops as reference_ops


def test_reference_ops_are_the_operator_set():
    assert tuple(reference_ops.__all__) == backends.OPERATORS
    assert all(callable(getattr(reference_ops, name)) for name in backends.OPERATORS)


def test_fast_path_has_the_reference_signatures(gpu_backend):
    """One interface: every operator of the CuPy set takes the reference's parameters, in order,
    of the same kinds (positional, keyword-only) and with the same defaults."""
    def parameters(op):
        return [(p.name, p.kind, p.default) for p in inspect.signature(op).parameters.values()]

    assert tuple(gpu_backend.ops.__all__) == backends.OPERATORS
    for name in backends.OPERATORS:
        assert parameters(getattr(gpu_backend.ops, name)) == parameters(getattr(reference_ops, name)), name


@pytest.mark.parametrize("device, device_id, message", [
    ("cuda", 0, r"device must be one of \('cpu', 'gpu'\), got 'cuda'"),
    ("gpu", -1, "device_id must be a GPU index >= 0, got -1"),
    ("gpu", "0", "device_id must be a GPU index >= 0, got '0'"),
])
def test_get_backend_rejects(device, device_id, message):
    with pytest.raises(ValueError, match=message):
        backends.get_backend(device, device_id)


def test_numpy_backend():
    b = backends.get_backend("cpu")
    assert (b.name, b.device, b.xp, b.ops) == ("numpy", "cpu", np, reference_ops)
    assert b.warm_up(COCO_SETTINGS, 8) is None
    a = np.arange(3)
    assert b.to_host(a) is a and b.asarray([1, 2], dtype=np.int32).dtype == np.int32


def roi_step_inputs(rng, batch: int, channels: int, canvas=CANVAS):
    """Proposals, maps and image sizes of ``batch`` images on ``canvas`` (landscape sizes, turned
    for a portrait canvas, clipped to a square one)."""
    sizes = image_sizes_for(batch)
    if canvas[0] > canvas[1]:
        sizes = sizes[:, ::-1].copy()
    sizes = np.minimum(sizes, np.asarray(canvas, np.float32))
    props = np.stack([realistic_proposals(rng, s) for s in sizes])
    return props, canvas_features(rng, batch, channels, sizes, canvas=canvas), sizes


def test_roi_step_matches_torchvision(backend):
    """One image, 256 channels, the default settings: 1000 RoIs whose pooled features are
    torchvision MultiScaleRoIAlign's, counts and RoIs as the operators give them."""
    rng = np.random.default_rng(11)
    props, feats, sizes = roi_step_inputs(rng, 1, COCO_SETTINGS.fpn_channels)
    got = backend.roi_step(props, feats, sizes, COCO_SETTINGS)
    rois, features, counts = host(backend, got.rois, got.features, got.counts)
    assert rois.shape == (1000, 4) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, [1000])
    assert features.shape == (1000, 7, 7, 256)
    assert np.abs(features - tv_multiscale(feats, rois, np.zeros(len(rois), np.int32), sizes)).max() <= ATOL


@pytest.mark.parametrize("batch", [1, 8])
def test_fast_roi_step_matches_reference(gpu_backend, batch):
    """8 images x 4390 proposals: NMS keep sets and their order identical to the NumPy step's,
    pooled features within ATOL."""
    rng = np.random.default_rng(100 + batch)
    props, feats, sizes = roi_step_inputs(rng, batch, 8)
    got = gpu_backend.roi_step(props, feats, sizes, COCO_SETTINGS)
    ref = reference().roi_step(props, feats, sizes, COCO_SETTINGS)
    np.testing.assert_array_equal(host(gpu_backend, got.counts), ref.counts)
    np.testing.assert_array_equal(host(gpu_backend, got.rois), ref.rois)
    assert got.features.shape == ref.features.shape
    assert np.abs(host(gpu_backend, got.features) - ref.features).max() <= ATOL


def test_warm_up_holds_the_pool_any_batch_needs(gpu_backend):
    """After warm_up(max_batch), roi steps on batches of 1..max_batch (inputs joined from
    several requests, as the roi model does) on any of the default canvases take no new memory
    from CuPy's pool: the warm-up sized it on the largest canvas.  Control: the same steps on a
    fresh pool without the warm-up do take more."""
    cp = gpu_backend.xp
    max_batch = 4
    rng = np.random.default_rng(5)
    batches = []
    for n, canvas in ((1, (800, 1344)), (3, (1344, 800)), (2, (800, 800)), (4, (800, 1344)), (1, (1088, 800)),
                      (4, (1344, 800)), (2, (800, 1088))):
        assert canvas in COCO_SETTINGS.canvases
        props, feats, sizes = roi_step_inputs(rng, n, COCO_SETTINGS.fpn_channels, canvas)
        # as many rows as the rpn emits for the settings' canvas, the rest dropped (level -1)
        pad = np.zeros((n, COCO_SETTINGS.num_proposals - props.shape[1], 6), np.float32)
        pad[..., 5] = -1
        props = np.concatenate([props, pad], axis=1)
        # inputs as requests of one image each, outside the pool (Triton's memory in serving)
        batches.append(([cp.asarray(p[None]) for p in props], [[cp.asarray(f[i:i + 1]) for i in range(n)]
                                                               for f in feats], cp.asarray(sizes)))

    def serve(pool):
        with cp.cuda.using_allocator(pool.malloc):
            for props, feats, sizes in batches:
                out = gpu_backend.roi_step(cp.concatenate(props), [cp.concatenate(f) for f in feats], sizes,
                                           COCO_SETTINGS)
                assert int(out.counts.sum()) > 0
                del out
        cp.cuda.Device().synchronize()

    pool = cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(pool.malloc):
        gpu_backend.warm_up(COCO_SETTINGS, max_batch)
    reserved = pool.total_bytes()
    serve(pool)
    assert pool.total_bytes() == reserved
    cold = cp.cuda.MemoryPool()
    serve(cold)
    assert cold.total_bytes() > 0
    with pytest.raises(ValueError, match="max_batch must be positive"):
        gpu_backend.warm_up(COCO_SETTINGS, 0)
