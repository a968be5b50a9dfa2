"""What the client writes: a line per image, JSON lines, annotated images, progress and throughput."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

# A bar for a handful of images would only flicker.
PROGRESS_MIN_IMAGES = 8
TOP_CLASSES = 3
# Drawings: the boxes shown unless --min-score says otherwise (the server returns up to 100 per
# image, down to the model's score threshold, which would bury the picture), and the longest side
# a drawing is scaled down to
DRAW_MIN_SCORE = 0.5
DRAW_MAX_SIDE = 2048


def error_record(image: str, message: str) -> dict:
    return {"image": image, "error": message, "detections": []}


def error_line(record: dict) -> str:
    """``error: <image>: <message>``, or ``error: <message>`` where the message names the image."""
    image, message = record["image"], record["error"]
    return f"error: {message}" if image in message else f"error: {image}: {message}"


def summary_line(record: dict) -> str:
    """``photo.jpg: 9 detections, 48 ms: person 0.99 (x3), dog 0.80, cup 0.41 (x2) and 2 more classes``:
    the classes ranked by their best score, each with how many detections it has."""
    dets = record["detections"]
    best: dict[str, list] = {}  # label -> [top score, count]
    for d in dets:
        entry = best.setdefault(d["label"], [d["score"], 0])
        entry[0] = max(entry[0], d["score"])
        entry[1] += 1
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
    tops = [f"{label} {score:.2f}" + (f" (x{n})" if n > 1 else "") for label, (score, n) in ranked[:TOP_CLASSES]]
    line = f"{record['image']}: {len(dets)} detection{'' if len(dets) == 1 else 's'}"
    if record.get("latency_ms") is not None:
        line += f", {record['latency_ms']:.0f} ms"
    if tops:
        line += ": " + ", ".join(tops)
    if len(ranked) > TOP_CLASSES:
        line += f" and {len(ranked) - TOP_CLASSES} more class{'' if len(ranked) == TOP_CLASSES + 1 else 'es'}"
    if record.get("annotated"):
        line += f" -> {record['annotated']}"
    return line


def annotated_paths(images: list[Path], folder: Path) -> dict[Path, Path]:
    """One distinct PNG per image: ``x.jpg`` -> ``folder/x.jpg.png``, so ``x.jpg`` and ``x.png``
    don't collide; the same file name from another folder gets ``x.jpg.2.png``, ``x.jpg.3.png``...
    Names are compared case-insensitively (macOS and Windows file systems)."""
    taken: set[str] = set()
    out = {}
    for image in images:
        name, k = f"{image.name}.png", 2
        while name.casefold() in taken:
            name, k = f"{image.name}.{k}.png", k + 1
        taken.add(name.casefold())
        out[image] = Path(folder) / name
    return out


def drawing_style(width: int, height: int) -> tuple[int, int]:
    """(line width, caption font size) in pixels for a drawing of ``width`` x ``height``: both
    grow with the longest side, so boxes and captions read the same on a thumbnail and a photo."""
    side = max(width, height)
    return max(2, round(side / 320)), max(11, round(side / 50))


def draw(image, detections: list[dict], out_path: Path, max_side: int = DRAW_MAX_SIDE) -> None:
    """``image`` (``[H, W, 3]`` uint8 RGB, as decoded for the server) with a box and a "label score"
    caption per detection (boxes x1, y1, x2, y2 in its pixels), saved as PNG; scaled down to
    ``max_side`` on its longest side where it is larger (0: never)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    scale = min(1.0, max_side / max(img.size)) if max_side else 1.0
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    width, font_size = drawing_style(*img.size)
    font = ImageFont.load_default(size=font_size)
    pen = ImageDraw.Draw(img)
    for d in detections:
        x1, y1, x2, y2 = (v * scale for v in d["box"])
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=width)
        # the caption on a filled band above the box (inside it at the picture's top edge)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        pad = width
        y = y1 - (bottom - top) - 2 * pad if y1 - (bottom - top) - 2 * pad >= 0 else y1
        pen.rectangle([x1, y, x1 + right - left + 2 * pad, y + bottom - top + 2 * pad], fill=(255, 40, 40))
        pen.text((x1 + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path, format="PNG")


def _progress_bar(total: int):
    """A rich progress bar on stderr, started; None where rich is not installed."""
    try:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
    except ImportError:
        return None
    # Lines printed while the bar is live are routed above it.  stdout only when it is a terminal
    # too: when it is piped, its lines must go down the pipe, not onto the bar's stderr.
    bar = Progress(TextColumn("detecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                   redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)
    bar.add_task("detecting", total=total)
    bar.start()
    return bar


class Report:
    """Writes each record as it comes, counts failures, and ends with a throughput line on stderr.

    Default: a :func:`summary_line` per image on stdout.  ``json_lines``: the records as JSON on
    stdout instead.  ``jsonl``: an open text file that gets the records as JSON lines as well.
    Errors always go to stderr as ``error: <image>: <message>``.
    """

    def __init__(self, total: int, json_lines: bool = False, jsonl=None, progress: bool = True):
        self.json_lines = json_lines
        self.jsonl = jsonl
        self.failed = 0
        self.answered = 0
        self.seconds = 0.0
        show = progress and total > PROGRESS_MIN_IMAGES and sys.stderr.isatty()
        self._bar = _progress_bar(total) if show else None

    def add(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.json_lines:
            print(json.dumps(record), flush=True)
        elif "error" not in record:
            print(summary_line(record), flush=True)
        if "error" in record:
            self.failed += 1
            print(error_line(record), file=sys.stderr, flush=True)
        else:
            self.answered += 1
        if self._bar is not None:
            self._bar.advance(self._bar.task_ids[0])

    @contextlib.contextmanager
    def timed(self):
        """The wall time of the records added inside, for the throughput line."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self, summary: bool = True) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if not summary:
            return
        print(self.summary(), file=sys.stderr)

    def summary(self) -> str:
        """``11 inputs: 6 answered in 2.00 s (3.0 images/s), 5 failed``: every input is answered or
        failed, and the throughput is over the answered images only."""
        total = self.answered + self.failed
        answered = f"{self.answered} answered"
        if self.answered and self.seconds > 0:
            answered += f" in {self.seconds:.2f} s ({self.answered / self.seconds:.1f} images/s)"
        return f"{total} input{'' if total == 1 else 's'}: {answered}, {self.failed} failed"
