"""evaluation/synthetic.py and evaluation/training.py on the CPU: the generated scenes and two
training steps at a tiny size."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import synthetic as sc
from evaluation import training as tr

SEEDS_AND_INDICES = [(0, i) for i in range(12)] + [(7, 3), (123, sc.HELD_OUT)]


def test_scenes_are_deterministic_for_a_seed():
    a, b = sc.make_scene(5, 17), sc.make_scene(5, 17)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = sc.make_scene(6, 17)
    assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    nxt = sc.make_scene(5, 18)
    assert nxt.image.shape != a.image.shape or not np.array_equal(nxt.image, a.image)


def test_dataset_items_do_not_depend_on_order():
    data = sc.SyntheticScenes(4, seed=3)
    later_first = data[3]
    _ = data[0], data[1]
    again = data[3]
    assert later_first[0].dtype.is_floating_point is False
    np.testing.assert_array_equal(later_first[0].numpy(), again[0].numpy())
    np.testing.assert_array_equal(later_first[1]["boxes"].numpy(), sc.make_scene(3, 3).boxes)


@pytest.mark.parametrize("seed,index", SEEDS_AND_INDICES)
def test_scene_targets(seed, index):
    s = sc.make_scene(seed, index)
    h, w = s.image.shape[:2]
    assert s.image.dtype == np.uint8 and s.image.shape[2] == 3 and (h, w) in sc.IMAGE_SIZES
    assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.labels), 4)
    assert s.labels.dtype == np.int64
    assert sc.MIN_OBJECTS <= len(s.labels) <= sc.MAX_OBJECTS
    assert np.all((s.labels >= 1) & (s.labels <= len(sc.SHAPES)))
    x1, y1, x2, y2 = s.boxes.T
    assert np.all((x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h))
    assert np.all((x2 - x1 >= sc.MIN_SIDE) & (y2 - y1 >= sc.MIN_SIDE))
    for i, (box, label) in enumerate(zip(s.boxes, s.labels)):
        # the drawn pixels' extent is the box (Pillow's polygon edges may miss a pixel at a corner)
        ys, xs = np.nonzero(s.instances == i + 1)
        assert len(xs) > 0
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_allclose(drawn, box, atol=1.0)
        # and those pixels have the class's colour: nearest of the colour families
        mean = s.image[ys, xs].astype(np.float64).mean(axis=0)
        nearest = int(np.argmin([np.linalg.norm(mean - np.array(c)) for c in sc.BASE_COLOURS])) + 1
        assert nearest == label, (mean, label)
        # a filled shape covers a fair part of its box (a triangle half, an ellipse pi/4)
        area = (box[2] - box[0]) * (box[3] - box[1])
        assert 0.4 * area <= len(xs) <= area
    assert np.all(s.instances <= len(s.labels))


def test_every_class_and_several_sizes_occur():
    scenes = [sc.make_scene(0, i) for i in range(40)]
    assert {int(label) for s in scenes for label in s.labels} == set(range(1, len(sc.SHAPES) + 1))
    assert len({s.image.shape for s in scenes}) >= 3


def test_fewer_classes_and_a_given_size():
    s = sc.make_scene(1, 2, num_classes=1, size=(200, 300))
    assert s.image.shape == (200, 300, 3)
    assert len(s.labels) >= 1 and set(s.labels.tolist()) == {1}


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_classes=0), "num_classes must be in 1..3"),
    (dict(num_classes=4), "num_classes must be in 1..3"),
    (dict(size=(20, 300)), "too small"),
])
def test_bad_scene_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sc.make_scene(0, 0, **kwargs)


def test_lr_schedule():
    cfg = tr.TrainConfig(steps=1000, warmup_steps=100, tail=0.3, final_lr_factor=0.05)
    assert tr.lr_factor(0, 0.0, cfg) == pytest.approx(0.001)
    assert tr.lr_factor(50, 0.05, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert tr.lr_factor(100, 0.1, cfg) == 1.0
    assert tr.lr_factor(600, 0.7, cfg) == 1.0
    assert tr.lr_factor(850, 0.85, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert tr.lr_factor(999, 1.0, cfg) == pytest.approx(0.05)


def test_match_counting():
    ref = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    assert tr.count_matched(ref, [1, 2], ref, [1, 2], 0.9) == 2
    assert tr.count_matched(ref, [1, 2], ref, [1, 1], 0.9) == 1  # label differs
    assert tr.count_matched(ref, [1, 2], ref[:1], [1], 0.9) == 1  # one to one
    assert tr.count_matched(ref, [1, 1], ref[:1].repeat(2, 0), [1, 1], 0.9) == 1
    assert tr.count_matched(ref, [1, 2], ref + [0, 0, 2, 0], [1, 2], 0.9) == 0  # IoU 10/12
    assert tr.count_matched(ref, [1, 2], np.zeros((0, 4)), [], 0.5) == 0


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="optimizer must be"):
        tr.train(tr.TrainConfig(optimizer="adam", device="cpu"))
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        tr.train(tr.TrainConfig(steps=0, device="cpu"))
    with pytest.raises(ValueError, match="device must be"):
        tr.resolve_device("tpu")


def test_two_training_steps_save_a_checkpoint_that_loads(tmp_path):
    import torch

    from exporters.loading import checkpoint_model

    lines = []
    cfg = tr.TrainConfig(steps=2, batch_size=2, min_size=128, max_size=160, device="cpu", workers=0,
                         log_every=1, seconds=600)
    model = tr.train(cfg, log=lines.append)
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == 2, lines
    losses = [float(ln.split("loss ")[1].split()[0]) for ln in step_lines]
    assert all(math.isfinite(v) and v > 0 for v in losses), step_lines
    assert "classifier" in step_lines[0] and "objectness" in step_lines[0]
    assert any("trained 2 steps" in ln for ln in lines), lines
    assert not model.training

    torch.manual_seed(cfg.seed)  # train() seeds the same way before it builds the model: its initial weights
    before = tr.build_model().state_dict()
    path = tr.save(model, tmp_path / "sub" / "synthetic.pt")
    loaded = checkpoint_model(path)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == len(sc.SHAPES) + 1
    # the transform is torchvision's default: the training sizes are not part of the checkpoint
    assert tuple(loaded.transform.min_size) == (800,) and loaded.transform.max_size == 1333
    saved = torch.load(path, weights_only=True)
    state = loaded.state_dict()
    assert saved.keys() == state.keys()
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    # two SGD steps moved the weights (warm-up lr is small, but not zero) and BatchNorm statistics
    moved = {k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], before[k])}
    assert {"roi_heads.box_predictor.cls_score.weight", "backbone.body.bn1.running_mean"} <= moved
    # ... by little: ``before`` is the same initialisation, two warm-up steps are a small change
    for k in ("backbone.body.conv1.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert (saved[k] - before[k]).abs().max() < 0.1 * before[k].abs().max(), k


def test_self_check_reports(tmp_path):
    from exporters.loading import random_model

    lines = []
    model = random_model(num_classes=len(sc.SHAPES) + 1, min_size=128, max_size=160)
    out = tr.self_check(model, num_images=1, log=lines.append)
    assert out["objects"] == len(sc.make_scene(0, sc.HELD_OUT).labels) > 0
    assert 0 <= out["found"] <= out["objects"] and 0.0 <= out["mean_top_score"] <= 1.0
    assert "fp16_kept" not in out  # CPU: no autocast comparison
    assert len(lines) == 1 and "held-out" in lines[0]
    assert tuple(model.transform.min_size) == (128,) and model.transform.max_size == 160  # restored
