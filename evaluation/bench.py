"""The stages of a benchmark run on one server: start it (GPU memory before and after), warm each
model up, check its accuracy, sweep it with perf_analyzer per input kind, read Triton's statistics
around each sweep, stop it and keep its log.

What a run measured accumulates in a :class:`Record`; a stage that fails is written into
``Record.failures`` (the run then fails) and the run goes on with the next one, so one broken model
does not hide the others' figures.  A stage left out on purpose (perf_analyzer absent, a precision
the export refuses) goes into ``Record.notes`` with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from evaluation import accuracy, memory, perf_analyzer, server, triton_stats
from evaluation.memory import MIB
from evaluation.parity import Criterion, Detections

log = logging.getLogger(__name__)


@dataclass
class Record:
    """Everything a run measured, as the rows of its tables, plus what failed and what was left out."""

    perf_rows: list[dict] = field(default_factory=list)
    eager_rows: list[dict] = field(default_factory=list)
    breakdown_rows: list[dict] = field(default_factory=list)
    acc_rows: list[dict] = field(default_factory=list)
    memory_rows: list[dict] = field(default_factory=list)
    decoders: list[str] = field(default_factory=list)
    server_logs: list[str] = field(default_factory=list)  # per server: its error lines, counted, the last few
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        log.error("%s", what)
        self.failures.append(what)

    def note(self, what: str) -> None:
        log.warning("%s", what)
        self.notes.append(what)


@dataclass
class Check:
    """An accuracy check: ``payloads`` (name -> encoded bytes or decoded array) sent to ``model``,
    its detections judged against ``reference`` by ``criterion``, rows named ``name``."""

    name: str
    model: str
    payloads: dict
    reference: dict[str, Detections]
    criterion: Criterion


@dataclass
class Sweep:
    """perf_analyzer on ``model`` at each of ``concurrencies``; the breakdown reads the statistics of
    ``model`` and of ``steps`` (an ensemble's steps)."""

    model: str
    concurrencies: list[int]
    steps: tuple[str, ...] = ()


@dataclass
class Target:
    """One model of a server to measure: its labels in the tables (``model``, ``precision``,
    ``variant``), a :class:`Sweep` per input kind, and its accuracy checks."""

    labels: dict
    sweeps: dict[str, Sweep]
    checks: list[Check] = field(default_factory=list)

    def run_name(self, kind: str) -> str:
        parts = [self.labels["model"], self.labels["precision"], self.labels.get("variant", "")]
        return "_".join(p for p in parts if p) + ("" if kind == "raw" else f"_{kind}")


@dataclass
class Plan:
    """How every sweep runs: perf_analyzer's settings (None: perf left out, ``skip_why`` says why),
    the real-input file and warm-up payloads per input kind, scratch folder."""

    perf: perf_analyzer.PerfSettings | None
    input_data: dict[str, Path]
    payloads: dict[str, list]
    work: Path
    skip_why: str = ""
    mps: bool = False
    warm_up: bool = True  # before the sweeps: every batch size's first call (CUDA graphs, autotuning)


def measure_server(rec: Record, repo: Path, targets: list[Target], plan: Plan, log_name: str,
                   memory_labels: dict | None = None) -> None:
    """Start a server on ``repo``, measure each of ``targets``, stop it.  ``memory_labels``: sample
    the server's GPU memory (ready, and after the load) into ``rec.memory_rows`` with these labels."""
    import tritonclient.grpc as grpcclient

    used = memory.gpu_memory_used()
    before = used // MIB if used >= 0 else -1
    try:
        triton = server.start_server(repo, plan.mps)
    except Exception as e:  # noqa: BLE001 - the run goes on with the next server, the failure recorded
        rec.fail(f"server on {Path(repo).name} did not start: {e}")
        return
    try:
        if memory_labels is not None:
            rec.memory_rows.append(memory.server_gpu_sample(triton.process.pid, before, **memory_labels, when="ready"))
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        for target in targets:
            try:
                measure_target(rec, client, triton.grpc_url, target, plan)
            except Exception as e:  # noqa: BLE001 - e.g. the server died: the next targets say so too
                rec.fail(f"{target.run_name('raw')}: {type(e).__name__}: {e}")
        if memory_labels is not None:
            rec.memory_rows.append(memory.server_gpu_sample(triton.process.pid, before, **memory_labels,
                                                            when="after the load"))
    finally:
        triton.stop()
        errors = server.report_server_log(triton, plan.work / log_name)
        last = "".join(f"; `{e.strip()[:160]}`" for e in errors[-3:])
        rec.server_logs.append(f"{log_name}: {len(errors)} error lines{last}")
        rec.decoders += [f"{Path(repo).name}: {d}" for d in server.decoder_lines(triton.log_text())]


def measure_target(rec: Record, client, url: str, target: Target, plan: Plan) -> None:
    """Warm-up (only before perf_analyzer runs, and where ``plan.warm_up``), accuracy checks, then per
    input kind a perf_analyzer sweep between two statistics snapshots."""
    warmed = set(target.sweeps) if plan.perf is not None and not plan.warm_up else set()
    if plan.perf is not None and plan.warm_up:
        for kind, sweep in target.sweeps.items():
            try:
                server.warm_up(client, sweep.model, plan.payloads[kind])
                warmed.add(kind)
            except Exception as e:  # noqa: BLE001
                rec.fail(f"{target.run_name(kind)}: {e}")
    for check in target.checks:
        try:
            served = accuracy.served_detections(client, check.model, check.payloads)
        except Exception as e:  # noqa: BLE001
            rec.fail(f"accuracy of {check.name}: {e}")
            continue
        rows = accuracy.accuracy_rows(check.name, check.reference, served, check.criterion)
        rec.acc_rows += rows
        log.info("%s accuracy: %s", check.name, [(r["image"], r["matched"], r["reference"], r["pass"]) for r in rows])
    for kind, sweep in target.sweeps.items():
        if kind not in warmed:
            continue
        name = target.run_name(kind)
        models = (sweep.model, *sweep.steps)
        before = triton_stats.stats_snapshot(client)
        ps = dataclasses.replace(plan.perf, url=url, input_data=plan.input_data[kind])
        # the lowest and highest concurrency on their own too: where the latency goal's milliseconds
        # go (concurrency 1), and the batches and queues under the most load (the whole sweep's
        # averages mix every concurrency's)
        apart = {min(sweep.concurrencies), max(sweep.concurrencies)}
        for c in sweep.concurrencies:
            alone = triton_stats.stats_snapshot(client) if c in apart else None
            result = perf_analyzer.run_perf(ps, sweep.model, c, plan.work / f"pa_{name}_{c}.csv")
            if result is None:
                rec.fail(f"perf_analyzer {name} at concurrency {c} failed (the log above says why)")
                continue
            if alone is not None:
                rec.breakdown_rows += [dict(run=f"{name} at concurrency {c}", **r) for r in
                                       triton_stats.breakdown(alone, triton_stats.stats_snapshot(client), models)]
            row = perf_analyzer.perf_row({"run": name, **target.labels, "input": kind}, result)
            rec.perf_rows.append(row)
            log.info("%s c=%d: %.1f img/s, p50 %.1f ms, p99 %.1f ms", name, c, row["infer_per_s"], row["p50_ms"],
                     row["p99_ms"])
        after = triton_stats.stats_snapshot(client)
        rec.breakdown_rows += [dict(run=name, **r) for r in triton_stats.breakdown(before, after, models)]
