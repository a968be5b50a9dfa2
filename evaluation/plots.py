"""The benchmark's figures, drawn with matplotlib (the ``dev`` extra; ``pip install matplotlib``).

Each function raises :class:`PlotUnavailable` where matplotlib is not installed, so that a
benchmark can skip its figure with that reason and keep its tables.
"""
from __future__ import annotations

from pathlib import Path


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed here."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(f"matplotlib is not installed ({e}); pip install matplotlib to draw figures") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def throughput_latency(path: Path, rows: list[dict], title: str) -> Path:
    """Throughput (x, ``infer_per_s``) against p99 latency (y, ``p99_ms``, log scale), one line per
    ``run`` (else per ``model``), each point labelled by its ``concurrency``; written to ``path`` (PNG)."""
    plt = _pyplot()
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r.get("run", r["model"]), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for model, pts in series.items():
        pts = sorted(pts, key=lambda r: r["concurrency"])
        xs, ys = [p["infer_per_s"] for p in pts], [p["p99_ms"] for p in pts]
        ax.plot(xs, ys, marker="o", label=model)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(str(p["concurrency"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend()
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def memory_over_time(path: Path, samples: list[dict], title: str) -> Path:
    """GPU memory (``gpu_mib``) and server RSS (``server_rss_mib``) against time (``t_s``), as
    :func:`evaluation.memory.sample` records them; written to ``path`` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    t = [s["t_s"] for s in samples]
    ax.plot(t, [s["gpu_mib"] for s in samples], marker=".", label="GPU memory used (MiB)")
    ax.plot(t, [s["server_rss_mib"] for s in samples], marker=".", label="server + stubs RSS (MiB)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
