"""The performance goals of a benchmark run, judged from its measurements: pure, no GPU, no server.

A run hands over what it measured, as the rows its tables hold:

- ``perf_rows``: served throughput and latency, one row per (model, precision, variant, input,
  concurrency): ``model`` is ``ensemble`` or ``baseline`` (torchvision served by Triton, one row set
  per serving variant), ``input`` a key of :data:`evaluation.payloads.INPUT_KINDS`, ``infer_per_s``
  and ``p99_ms`` as perf_analyzer reports them;
- ``eager_rows``: torchvision eager alone, no server (:mod:`evaluation.eager_bench`): ``precision``,
  ``batch``, ``images_per_s``;
- ``memory_rows``: GPU memory of the ensemble's server (:func:`evaluation.memory.server_gpu_sample`):
  ``precision``, ``device_delta_mib`` and ``process_sum_mib``;
- ``acc_rows``: accuracy rows (:func:`evaluation.accuracy.accuracy_rows`), ``model`` named
  ``ensemble_<precision>`` (decoded input) or ``ensemble_<precision>_encoded``.

:func:`evaluate` turns them into one :class:`Goal` per line of the goals table.  A goal whose figure
was not measured in this run (its precision not run, perf_analyzer absent) says so and does not
count as missed; :func:`exit_code` is 1 when any goal is missed.  The targets are
:data:`TARGETS` (the performance goals the benchmark gates).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.parity import FP16, FP16_IMAGE_MIN, fp16_overall, worst_image

MET, NOT_MET, NOT_MEASURED, INFO = "met", "NOT MET", "not measured", "info"
GIB = 1024  # MiB


@dataclass(frozen=True)
class Targets:
    fp16_images_per_s: float = 750.0
    fp16_card: str = "H200"  # the absolute fp16 figure is a target on this card only
    fp16_vs_eager: float = 4.0  # x torchvision eager's best fp16 (autocast), no server
    fp16_vs_baseline: float = 5.0  # x the best variant of torchvision served by Triton, fp16
    fp32_vs_eager: float = 2.0  # x torchvision eager's best fp32, TF32 off on both sides
    p99_c1_ms: dict = field(default_factory=lambda: {"fp16": 10.0, "fp32": 20.0})
    memory_gib: float = 20.0  # the whole server, fp16 and fp32, default settings
    jpeg_vs_raw: float = 0.95  # JPEG 640x480 requests (decoded by the server) x decoded-pixel requests, best of each


TARGETS = Targets()
GATED = ("fp32", "fp16")  # precisions with targets; tf32 rows are information


@dataclass(frozen=True)
class Goal:
    goal: str
    measured: str
    target: str
    status: str  # MET, NOT_MET, NOT_MEASURED or INFO


def _select(rows: list[dict], **want) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def best_throughput(perf_rows: list[dict], model: str, precision: str, input_kind: str = "raw") -> dict | None:
    """The row of highest ``infer_per_s`` of one model/precision/input, over every variant and
    concurrency; None where there is none."""
    rows = _select(perf_rows, model=model, precision=precision, input=input_kind)
    return max(rows, key=lambda r: r["infer_per_s"]) if rows else None


def p99_at_one(perf_rows: list[dict], precision: str, input_kind: str = "raw") -> float | None:
    """p99 latency (ms) of the ensemble at concurrency 1; None where not measured."""
    rows = _select(perf_rows, model="ensemble", precision=precision, input=input_kind, concurrency=1)
    return rows[0]["p99_ms"] if rows else None


def eager_best(eager_rows: list[dict], precision: str) -> dict | None:
    """torchvision eager's row of highest ``images_per_s`` for ``precision``; None where none."""
    rows = _select(eager_rows, precision=precision)
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def server_memory_mib(memory_rows: list[dict], precision: str) -> int | None:
    """The ensemble server's GPU memory for ``precision``: the largest of its samples' device delta
    and process sum (each can miss something: another process's change, the MPS server); None where
    nothing was sampled."""
    values = [max(r["device_delta_mib"], r["process_sum_mib"]) for r in _select(memory_rows, precision=precision)]
    values = [v for v in values if v >= 0]
    return max(values) if values else None


def _judge(value: float | None, ok, measured: str, why_missing: str) -> tuple[str, str]:
    if value is None:
        return f"- ({why_missing})", NOT_MEASURED
    return measured, MET if ok(value) else NOT_MET


def _variant(row: dict) -> str:
    return f"{row['variant']}, " if row.get("variant") else ""


def throughput_goals(card: str, perf_rows: list[dict], eager_rows: list[dict], precisions,
                     why_missing: str, targets: Targets = TARGETS) -> list[Goal]:
    """fp16: images/s on the target card, x torchvision eager's best, x the best served baseline;
    fp32: x torchvision eager's best; tf32: the same ratio as information."""
    goals = []
    if "fp16" in precisions:
        ens = best_throughput(perf_rows, "ensemble", "fp16")
        value = ens["infer_per_s"] if ens else None
        measured = f"{value:.1f} images/s (concurrency {ens['concurrency']})" if ens else ""
        target = f">= {targets.fp16_images_per_s:.0f} images/s on an {targets.fp16_card}"
        text, status = _judge(value, lambda v: v >= targets.fp16_images_per_s, measured, why_missing)
        if status != NOT_MEASURED and targets.fp16_card not in card:
            text, status = f"{text}; this card is {card}: the absolute target is for an {targets.fp16_card}", INFO
        goals.append(Goal("fp16 throughput", text, target, status))
    ratio_specs = (("fp16", "torchvision eager's best fp16 (autocast)", "eager", targets.fp16_vs_eager),
                   ("fp16", "the best served torchvision baseline, fp16", "baseline", targets.fp16_vs_baseline),
                   ("fp32", "torchvision eager's best fp32 (TF32 off on both sides)", "eager", targets.fp32_vs_eager),
                   ("tf32", "torchvision eager's best with TF32 on (TF32 on both sides)", "eager", None))
    for precision, what, against, target in ratio_specs:
        if precision not in precisions:
            continue
        ens = best_throughput(perf_rows, "ensemble", precision)
        if against == "eager":
            other = eager_best(eager_rows, precision)
            other_value = other["images_per_s"] if other else None
            other_text = f"batch {other['batch']}" if other else ""
        else:
            other = best_throughput(perf_rows, "baseline", precision)
            other_value = other["infer_per_s"] if other else None
            other_text = f"{_variant(other)}concurrency {other['concurrency']}" if other else ""
        name = f"{precision} vs {what}"
        if ens is None or not other_value:
            missing = why_missing if ens is None else f"no {against} figure"
            goals.append(Goal(name, f"- ({missing})", f">= {target:g}x" if target else "information",
                              NOT_MEASURED if target else INFO))
            continue
        ratio = ens["infer_per_s"] / other_value
        measured = f"{ratio:.2f}x ({ens['infer_per_s']:.1f} / {other_value:.1f} images/s, {other_text})"
        if target is None:
            goals.append(Goal(name, measured, "information (fp32's target: 2x)", INFO))
        else:
            goals.append(Goal(name, measured, f">= {target:g}x", MET if ratio >= target else NOT_MET))
    return goals


def latency_goals(perf_rows: list[dict], precisions, why_missing: str, targets: Targets = TARGETS) -> list[Goal]:
    """p99 latency at concurrency 1 (decoded input), per precision."""
    goals = []
    for precision in precisions:
        value = p99_at_one(perf_rows, precision)
        limit = targets.p99_c1_ms.get(precision)
        text = f"{value:.1f} ms" if value is not None else ""
        if limit is None:
            goals.append(Goal(f"p99 at concurrency 1, {precision}", text or f"- ({why_missing})", "information", INFO))
            continue
        text, status = _judge(value, lambda v: v <= limit, text, why_missing)
        goals.append(Goal(f"p99 at concurrency 1, {precision}", text, f"<= {limit:g} ms", status))
    return goals


def memory_goals(memory_rows: list[dict], precisions, targets: Targets = TARGETS) -> list[Goal]:
    """The ensemble server's GPU memory (every process, ready and after the load), per precision."""
    goals = []
    for precision in precisions:
        mib = server_memory_mib(memory_rows, precision)
        text = f"{mib / GIB:.1f} GiB ({mib} MiB)" if mib is not None else ""
        name = f"server GPU memory, {precision}"
        if precision not in GATED:
            goals.append(Goal(name, text or "- (not sampled)", "information", INFO))
            continue
        text, status = _judge(mib, lambda v: v <= targets.memory_gib * GIB, text, "not sampled: no nvidia-smi")
        goals.append(Goal(name, text, f"<= {targets.memory_gib:g} GiB", status))
    return goals


def accuracy_goals(acc_rows: list[dict], precisions, trained: bool) -> list[Goal]:
    """fp32: the parity criterion on every image; fp16 (and tf32, as information): the FP16
    criterion over all detections with no image below its floor.  fp16 is gated only with a
    trained checkpoint: seeded random weights give near-tied scores that any fp16 rounding reorders."""
    goals = []
    models = dict.fromkeys(r["model"] for r in acc_rows)
    for precision in precisions:
        mine = [m for m in models if m == f"ensemble_{precision}" or m.startswith(f"ensemble_{precision}_")]
        if not mine:
            goals.append(Goal(f"accuracy, {precision}", "- (not checked in this run)", "",
                              NOT_MEASURED if precision in GATED else INFO))
        for model in mine:
            rows = _select(acc_rows, model=model)
            if precision == "fp32":
                passed = sum(r["pass"] for r in rows)
                status = MET if rows and passed == len(rows) else NOT_MET
                goals.append(Goal(f"accuracy, {model}", f"{passed} of {len(rows)} images pass",
                                  "parity on every image", status))
                continue
            matched, reference, ok = fp16_overall(rows)
            worst = worst_image(rows)
            worst_text = f"; worst image {worst[0]} {worst[1]:.0%}" if worst else ""
            measured = f"{matched} of {reference} detections ({matched / max(reference, 1):.2%}){worst_text}"
            target = f">= {FP16.min_matched:.0%} of all, no image < {FP16_IMAGE_MIN:.0%}"
            if precision in GATED and trained:
                status = MET if ok else NOT_MET
            else:
                status = INFO
                measured += "" if trained else " (seeded random weights: information)"
            goals.append(Goal(f"accuracy, {model}", measured, target, status))
    return goals


def input_notes(perf_rows: list[dict], precisions, kinds: dict[str, str], decoder: str,
                targets: Targets = TARGETS) -> list[Goal]:
    """Information rows: throughput and p99 at concurrency 1 of the ensemble for each encoded input
    kind (``kinds``: {input key: description}), and which image decoder the server said it used;
    and the goal that JPEG 640x480 keeps ``targets.jpeg_vs_raw`` of the decoded input's throughput."""
    goals = []
    for precision in precisions:
        for kind, description in kinds.items():
            best = best_throughput(perf_rows, "ensemble", precision, kind)
            if best is None:
                continue
            p99 = p99_at_one(perf_rows, precision, kind)
            p99_text = f", p99 at concurrency 1 {p99:.1f} ms" if p99 is not None else ""
            goals.append(Goal(f"{precision}, {description}",
                              f"{best['infer_per_s']:.1f} images/s (concurrency {best['concurrency']}){p99_text}",
                              "information", INFO))
            raw = best_throughput(perf_rows, "ensemble", precision, "raw")
            if kind == "jpeg" and raw is not None and precision in GATED:
                ratio = best["infer_per_s"] / raw["infer_per_s"]
                goals.append(Goal(f"{precision}, JPEG 640x480 / decoded 640x480 throughput", f"{ratio:.3f}",
                                  f">= {targets.jpeg_vs_raw:g}", MET if ratio >= targets.jpeg_vs_raw else NOT_MET))
    if decoder:
        goals.append(Goal("image decoder (server log)", decoder, "information", INFO))
    return goals


def evaluate(card: str, precisions, perf_rows: list[dict], eager_rows: list[dict], memory_rows: list[dict],
             acc_rows: list[dict], *, trained: bool, why_missing: str = "not measured in this run",
             encoded_kinds: dict[str, str] | None = None, decoder: str = "",
             targets: Targets = TARGETS) -> list[Goal]:
    """Every goal of a run on ``card`` (its name, e.g. "NVIDIA H200") for the ``precisions`` it ran:
    throughput, latency, memory, accuracy, then information rows for encoded inputs
    (``encoded_kinds``: {input key: description}) and the decoder.  ``why_missing`` says why a perf
    figure is absent (perf_analyzer not found, say); ``trained``: the weights are a trained checkpoint."""
    precisions = list(precisions)
    return (throughput_goals(card, perf_rows, eager_rows, precisions, why_missing, targets)
            + latency_goals(perf_rows, precisions, why_missing, targets)
            + memory_goals(memory_rows, precisions, targets)
            + accuracy_goals(acc_rows, precisions, trained)
            + input_notes(perf_rows, precisions, encoded_kinds or {}, decoder, targets))


def exit_code(goals: list[Goal]) -> int:
    """1 when any goal is missed, else 0 (not measured and information rows don't count)."""
    return int(any(g.status == NOT_MET for g in goals))


def goals_markdown(goals: list[Goal]) -> str:
    """The goals as a markdown table, then a one-line verdict."""
    lines = ["| goal | measured | target | status |", "| --- | --- | --- | --- |"]
    for g in goals:
        status = f"**{g.status}**" if g.status == NOT_MET else g.status
        cells = (g.goal, g.measured, g.target, status)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    missed = [g.goal for g in goals if g.status == NOT_MET]
    lines += ["", f"**{len(missed)} goal(s) not met: {', '.join(missed)}**" if missed
              else "**every goal measured in this run is met**"]
    return "\n".join(lines) + "\n"
