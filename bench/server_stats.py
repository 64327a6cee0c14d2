"""CPU time and memory of another process, read from /proc (Linux only; elsewhere every reader raises OSError)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/<pid>/stat counts in ticks


@dataclass(frozen=True)
class ProcessSample:
    cpu_s: float  # utime + stime of every thread of the process so far, seconds (resolution 1 / CLOCK_TICKS)
    rss_bytes: int  # VmRSS now
    peak_rss_bytes: int  # VmHWM: the highest RSS since start, or since the last reset_peak()


def cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/<pid>/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing parenthesis.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from 1 before comm
    return (utime + stime) / CLOCK_TICKS


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
    rss, peak = memory_bytes(pid)
    return ProcessSample(cpu_seconds(pid), rss, peak)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/<pid>/clear_refs, Linux >= 4.0, own processes only).

    Returns False where that is refused; VmHWM then stays the peak since the process started.
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
