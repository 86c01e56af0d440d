"""A process's own memory: its peak and current resident memory as the OS counts it, and
handing its heap's freed pages back. What a rank reports and does after loading."""

from __future__ import annotations

import ctypes
import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; nothing elsewhere).
    Loading frees as much as it keeps: each packed weight's unpacked source, and while
    quantizing, each weight's float32 copy. glibc keeps those pages for reuse, so a rank
    quantized to int8 held 240 MiB of anonymous memory for 106 MiB of weights, more than
    the same rank in bf16; after a trim it holds 117."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def resident_mb() -> dict[str, float]:
    """Resident memory now, anonymous and file-backed, in MiB (Linux; {} elsewhere)."""
    fields = {"RssAnon:": "anon_rss_mb", "RssFile:": "file_rss_mb"}
    try:
        with open("/proc/self/status") as status:
            lines = [line.split() for line in status]
    except OSError:
        return {}
    return {fields[p[0]]: round(int(p[1]) / 1024, 1) for p in lines if p and p[0] in fields}
