"""What /proc says about a process: CPU seconds and resident memory (Linux only)."""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "peak_rss_mib", "rss_mib"]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far; 0 when it is gone or /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib(pid: int) -> float:
    """The most resident memory ``pid`` ever had (VmHWM)."""
    return _status_kib(pid, "VmHWM:") / 1024


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS:") / 1024
