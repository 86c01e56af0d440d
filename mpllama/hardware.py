"""What this machine's CPU computes natively, read from the kernel's CPU flags (Linux's
/proc/cpuinfo) rather than assumed: oneDNN runs bf16 products on any AVX-512 CPU, but
emulates them where the CPU lacks bf16 instructions, and then they are slower than
float32. No torch: the driver asks too (to size a CPU rank's KV cache)."""

from __future__ import annotations

import functools
from pathlib import Path

# Flags of instructions that compute bf16 products: AVX-512 BF16 (AMD Zen 4+, Intel
# Cooper Lake+) and AMX's bf16 tiles (Intel Sapphire Rapids+).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpuinfo(field: str) -> str:
    """``field`` of the first CPU in /proc/cpuinfo, or "" (not Linux, or not listed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags, or none where the kernel does not list them (not Linux)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor id: GenuineIntel, AuthenticAMD, or "" where not listed. Only for
    tuning what was measured on each (cpu_kernels.c's prefetches)."""
    return _cpuinfo("vendor_id")


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 product instructions (so bf16 beats float32 there)."""
    return bool(cpu_flags() & BF16_FLAGS)
