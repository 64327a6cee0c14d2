"""CPU time and memory of another process and its descendants, read from /proc (Linux only; elsewhere every
reader raises OSError). The server runs each model's engine in a child process, so a server's cost is its tree's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/<pid>/stat counts in ticks


@dataclass(frozen=True)
class ProcessSample:
    cpu_s: float  # utime + stime of every thread of the process and its live descendants so far, seconds
    rss_bytes: int  # VmRSS now, summed over the tree
    peak_rss_bytes: int  # VmHWM (the highest RSS since start or the last reset_peak()), summed over the tree
    processes: int = 1


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants (found by their parent pid in /proc/<pid>/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/<pid>/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing parenthesis.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from 1 before comm
    return (utime + stime) / CLOCK_TICKS


def cpu_seconds_exact(pid: int) -> float:
    """The CPU time every thread of `pid` and of its live descendants has run, from /proc/<pid>/task/*/schedstat
    (nanoseconds, where /proc/<pid>/stat counts 10 ms ticks); threads that ended meanwhile are not counted."""
    total = 0
    for p in tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*/schedstat"):
            try:
                total += int(task.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def memory_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) from /proc/<pid>/status, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # the kernel writes "kB" (KiB)
    if len(values) != 2:
        raise OSError(f"/proc/{pid}/status has no VmRSS/VmHWM (a kernel thread, or a zombie)")
    return values["VmRSS"], values["VmHWM"]


def sample(pid: int) -> ProcessSample:
    """The process tree of `pid`: CPU and memory summed (a child that exits takes its CPU time with it)."""
    cpu = rss = peak = n = 0
    for p in tree(pid):
        try:
            r, h = memory_bytes(p)
            c = cpu_seconds(p)
        except OSError:
            if p == pid:
                raise
            continue  # a child that ended meanwhile
        cpu, rss, peak, n = cpu + c, rss + r, peak + h, n + 1
    return ProcessSample(cpu, rss, peak, n)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/<pid>/clear_refs, Linux >= 4.0, own processes only).

    Returns False where that is refused; VmHWM then stays the peak since the process started. Every process of
    the tree is reset.
    """
    try:
        for p in tree(pid):
            Path(f"/proc/{p}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
