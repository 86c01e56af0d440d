"""A process's own memory: its peak and current resident memory as the OS counts it, and
handing its heap's freed pages back. What a rank reports, and does while and after
loading."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# While loading: blocks this large or larger get mappings of their own (``loading``).
LOADING_MMAP_THRESHOLD = 256 * 1024
# After: the values glibc's own adjustment stops at on 64-bit systems (blocks up to 32 MiB
# from the heap, a heap's top given back past 64 MiB).
MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_MAX = 32 << 20, 64 << 20


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
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """While a rank loads: glibc gives every block of 256 KiB or more a mapping of its
    own, so each weight's temporaries (its float32 copy while quantizing, its unpacked
    values while packing) go back to the OS as they are freed.

    Why: a rank loads on its torch thread, whose blocks come from one of glibc's thread
    arenas. After a mapped block is freed, glibc serves blocks up to its size from the
    heap and lets the heap keep twice that at its top; ``malloc_trim`` gives back a
    thread arena's free pages but never its top. Ranks of the bench model (MP=1, bf16)
    kept 13 MiB of freed temporaries after loading int4 and 6-33 MiB after loading int8,
    and 33-34 and 25-53 after a short run; with this, 2 and 6 after loading, 5-13 and
    8-16 after the run (benchmarks/RESULTS.md, session 13). Setting either threshold ends
    glibc's adjustment for good, so after the load they are set to where the adjustment
    stops. Nothing where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)


def _glibc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it (its malloc_trim and mallopt); else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def resident_mb() -> dict[str, float]:
    """Resident memory now, anonymous and file-backed, in MiB (Linux; {} elsewhere)."""
    fields = {"RssAnon:": "anon_rss_mb", "RssFile:": "file_rss_mb"}
    try:
        with open("/proc/self/status") as status:
            lines = [line.split() for line in status]
    except OSError:
        return {}
    return {fields[p[0]]: round(int(p[1]) / 1024, 1) for p in lines if p and p[0] in fields}
