"""What ``detect`` reports and draws, without a server: a summary whose counts add up (answered,
failed, all inputs) with throughput over the answered images only; drawings whose lines and
captions scale with the picture, leave out low scores by default, and are capped in size."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from client import output


def _summary(capsys, records_before: list[dict], timed: list[dict], seconds: float, monkeypatch) -> str:
    clock = iter([100.0, 100.0 + seconds])
    monkeypatch.setattr(output.time, "perf_counter", lambda: next(clock))
    report = output.Report(len(records_before) + len(timed), progress=False)
    for record in records_before:
        report.add(record)
    if timed:
        with report.timed():
            for record in timed:
                report.add(record)
    report.close()
    return capsys.readouterr().err.splitlines()[-1]


def _good(i: int) -> dict:
    return {"image": f"{i}.jpg", "detections": [], "latency_ms": 5.0}


def _bad(i: int) -> dict:
    return output.error_record(f"bad{i}.jpg", "not a decodable image")


def test_summary_counts_add_up_and_throughput_counts_answered_images(capsys, monkeypatch):
    """11 inputs: 2 that name no file, then 9 images sent of which 3 fail and 6 are answered."""
    line = _summary(capsys, [_bad(0), _bad(1)], [_good(i) for i in range(6)] + [_bad(i) for i in range(2, 5)],
                    seconds=2.0, monkeypatch=monkeypatch)
    assert line == "11 inputs: 6 answered in 2.00 s (3.0 images/s), 5 failed"


def test_summary_when_every_image_failed_gives_no_throughput(capsys, monkeypatch):
    line = _summary(capsys, [], [_bad(i) for i in range(5)], seconds=0.2, monkeypatch=monkeypatch)
    assert line == "5 inputs: 0 answered, 5 failed"
    assert "images/s" not in capsys.readouterr().err


def test_summary_when_all_answered(capsys, monkeypatch):
    line = _summary(capsys, [], [_good(0)], seconds=0.5, monkeypatch=monkeypatch)
    assert line == "1 input: 1 answered in 0.50 s (2.0 images/s), 0 failed"


# --- drawings ------------------------------------------------------------------------------------

def _red(image) -> np.ndarray:
    a = np.asarray(image.convert("RGB")).astype(int)
    return (a[..., 0] > 200) & (a[..., 1] < 100) & (a[..., 2] < 100)


def _line_width(image, y: int) -> int:
    """Thickness of the box's left edge, read along row ``y`` (red pixels from the left)."""
    row = _red(image)[y]
    start = int(np.argmax(row))
    return int(np.argmin(row[start:]))


def _drawn(tmp_path, h: int, w: int, boxes: list[tuple[float, list[float]]], **kw):
    from PIL import Image

    dets = [{"label": "person", "score": s, "box": b} for s, b in boxes]
    out = tmp_path / f"{h}x{w}.png"
    output.draw(np.zeros((h, w, 3), np.uint8), dets, out, **kw)
    return Image.open(out)


def test_line_width_and_caption_scale_with_the_picture(tmp_path):
    small = _drawn(tmp_path, 300, 400, [(0.9, [40, 30, 360, 270])])
    large = _drawn(tmp_path, 1500, 2000, [(0.9, [200, 150, 1800, 1350])])
    assert large.size == (2000, 1500)
    thin, thick = _line_width(small, 150), _line_width(large, 750)
    assert thin >= 2 and thick >= 4 * thin - 2, (thin, thick)
    # the caption: its text's height grows with the picture too (rows holding caption pixels above the box)
    caption_rows = lambda im, top: int(np.any(np.asarray(im.convert("L"))[:top] > 0, axis=1).sum())  # noqa: E731
    assert caption_rows(large, 150) >= 3 * caption_rows(small, 30)


def test_a_huge_picture_is_drawn_downscaled(tmp_path):
    big = _drawn(tmp_path, 3000, 4000, [(0.9, [400, 300, 3600, 2700])])
    assert big.size == (output.DRAW_MAX_SIDE, output.DRAW_MAX_SIDE * 3 // 4)
    scale = output.DRAW_MAX_SIDE / 4000
    red = _red(big)
    cols = np.flatnonzero(red[big.size[1] // 2])
    assert abs(cols[0] - 400 * scale) <= 1 and abs(cols[-1] - 3600 * scale) <= 1  # the box, scaled with the picture
    full = _drawn(tmp_path, 3000, 4000, [(0.9, [400, 300, 3600, 2700])], max_side=0)
    assert full.size == (4000, 3000)


def test_drawings_leave_out_low_scores_by_default_and_records_keep_them(tmp_path, monkeypatch):
    """detect_iter: the record holds every detection; the drawing only those at DRAW_MIN_SCORE or
    above, unless a min_score is given (the server is a stand-in)."""
    from client import detect

    assert output.DRAW_MIN_SCORE == 0.5
    dets = [{"label": "cat", "label_id": 17, "score": s, "box": [1, 1, 5, 5]} for s in (0.9, 0.5, 0.3, 0.05)]
    drawn: list[list[float]] = []
    monkeypatch.setattr(detect, "connect", lambda url: object())
    monkeypatch.setattr(detect, "check_model", lambda client, model, raw=None: {})
    monkeypatch.setattr(detect, "infer_iter", lambda client, payloads, concurrency: iter([("result", 0.01)]))
    monkeypatch.setattr(detect, "parse_result", lambda result, labels: list(dets))
    monkeypatch.setattr(output, "draw", lambda image, ds, out, **kw: drawn.append([d["score"] for d in ds]))
    image = tmp_path / "a.png"
    from evaluation.payloads import encode

    image.write_bytes(encode(np.zeros((8, 8, 3), np.uint8)))
    (record,) = detect.run("fake:1", [image], draw_dir=tmp_path / "out")
    assert [d["score"] for d in record["detections"]] == [0.9, 0.5, 0.3, 0.05] and drawn == [[0.9, 0.5]]
    (record,) = detect.run("fake:1", [image], draw_dir=tmp_path / "out", min_score=0.1)
    assert [d["score"] for d in record["detections"]] == [0.9, 0.5, 0.3] and drawn[-1] == [0.9, 0.5, 0.3]


def test_help_documents_the_drawing_defaults():
    from client.detect import build_parser

    text = " ".join(build_parser().format_help().split())
    assert re.search(r"--min-score S .*drawings .*below 0\.5", text), text
    assert f"(default: {output.DRAW_MAX_SIDE})" in text and "--draw-max-side" in text


def test_a_16_bit_png_is_drawn_from_its_8_bit_pixels(tmp_path):
    """The drawing shows the picture as the server saw it (not Pillow's white 16-bit grayscale)."""
    from PIL import Image

    from client.inputs import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), 100 * 256, np.uint16)).save(buf, format="PNG")
    out = tmp_path / "depth.png"
    output.draw(decode_image(buf.getvalue()), [], out)
    assert np.asarray(Image.open(out))[..., :3].max() == 100
    assert Path(out).is_file()
