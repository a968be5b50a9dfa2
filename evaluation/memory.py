"""Memory of a running server, sampled over time: GPU memory (nvidia-smi) and resident memory of the
server process and its python-backend stubs (``/proc/<pid>/status``), and whether it stayed flat.

Linux only (``/proc``); the GPU figures are -1 / empty where nvidia-smi is missing.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

MIB = 1 << 20


def gpu_memory_used(index: int = 0) -> int:
    """Bytes in use on GPU ``index`` (nvidia-smi), -1 if unavailable."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                              str(index)], capture_output=True, text=True, timeout=10).stdout.strip()
        return int(float(out.splitlines()[0])) * MIB
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return -1


def rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants (for tritonserver: the python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def process_label(pid: int) -> str:
    """``tritonserver``, or the model a python-backend stub serves (the model folder in its arguments)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    for a in args:
        a = a.decode(errors="replace")
        if a.endswith("model.py"):
            return Path(a).parent.parent.name  # <repository>/<model>/<version>/model.py
    return Path(args[0].decode(errors="replace")).name or str(pid)


def compute_apps() -> dict[int, int]:
    """{pid: GPU MiB} of every process nvidia-smi lists as using a GPU; empty where nvidia-smi is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    apps: dict[int, int] = {}
    for line in out.splitlines():
        try:
            pid, mib = (int(float(v)) for v in line.split(","))
        except ValueError:
            continue
        apps[pid] = apps.get(pid, 0) + mib
    return apps


def gpu_memory_by_process(pids: list[int]) -> str:
    """GPU memory of the processes ``pids`` as ``label=MiB`` pairs (nvidia-smi's compute apps), so
    that a growth can be traced to a step; empty where nvidia-smi lists none of them."""
    apps = compute_apps()
    return " ".join(sorted(f"{process_label(pid)}={apps[pid]}" for pid in pids if pid in apps))


def mps_server_pids() -> list[int]:
    """Processes named ``nvidia-cuda-mps-server``: an MPS daemon's server, which holds GPU memory on
    behalf of its clients."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "nvidia-cuda-mps-server":
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def server_gpu_sample(server_pid: int, before_mib: int, **labels) -> dict:
    """A server's GPU memory now, two ways: the card's memory in use minus ``before_mib`` (what it
    was before the server started; -1 where nvidia-smi is missing), and the sum over the server's
    processes, its python-backend stubs and any MPS server (nvidia-smi's compute apps), with the
    per-process pairs; after ``labels`` (precision, when...)."""
    used = gpu_memory_used()
    pids = tree_pids(server_pid) + mps_server_pids()
    apps = compute_apps()
    return {**labels, "device_delta_mib": used // MIB - before_mib if used >= 0 and before_mib >= 0 else -1,
            "process_sum_mib": sum(apps.get(p, 0) for p in pids) if apps else -1,
            "by_process": " ".join(sorted(f"{process_label(p)}={apps[p]}" for p in pids if p in apps))}


def sample(server_pid: int, t_s: float) -> dict:
    """One row of the memory table at ``t_s`` seconds: GPU MiB, the server's and its stubs' RSS MiB,
    and GPU MiB by process."""
    pids = tree_pids(server_pid)
    return {"t_s": round(t_s, 1), "gpu_mib": gpu_memory_used() // MIB,
            "server_rss_mib": sum(rss(p) for p in pids) // MIB, "gpu_mib_by_process": gpu_memory_by_process(pids)}


def flat(values: list[int], max_growth: int, fraction: float = 0.0) -> tuple[bool, int]:
    """(flat?, growth): growth from the end of the first quarter of ``values`` (warm-up, allocator pools
    filling) to the largest later value, against max(``max_growth``, ``fraction`` x that start).
    Fewer than 4 values, or a value that was not sampled (< 0): (False, -1), nothing to judge."""
    if len(values) < 4 or min(values) < 0:
        return False, -1
    start = values[len(values) // 4]
    growth = max(values[len(values) // 4:]) - start
    return growth <= max(max_growth, int(fraction * start)), growth
