"""A rank's load gives its temporaries back to the OS (``process_memory.loading``): each
case runs in a child process of its own, since glibc's thresholds are the process's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpllama.rank import process_memory

CHILD = r"""
import sys
import threading

import torch

from mpllama.rank.process_memory import loading, resident_mb


def load_like() -> None:
    # A weight's temporaries, one after another, on a thread that is not the main one
    # (a rank loads on its torch thread): 24 MiB each, freed before the next.
    for _ in range(4):
        x = torch.ones(6 << 20)
        del x


def run() -> None:
    if sys.argv[1] == "loading":
        with loading():
            load_like()
    else:
        load_like()


before = resident_mb()["anon_rss_mb"]
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(resident_mb()["anon_rss_mb"] - before)
"""


def kept_mb(cases: list[str]) -> list[float]:
    """What each child kept after its load, MiB (run side by side)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, how],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for how in cases
    ]
    kept = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        kept.append(float(out.split()[-1]))
    return kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_loading_gives_temporaries_back_on_a_thread() -> None:
    """Without ``loading``, glibc serves a thread's blocks after the first 24 MiB one
    from its arena's heap, and keeps them once freed (``malloc_trim`` gives back part
    of that, at times all, never reliably: a rank of the bench model kept 13 MiB after
    loading int4). With it, every block is mapped and unmapped when freed: nothing kept
    even before a trim."""
    if process_memory.resident_mb() == {}:
        pytest.skip("no /proc/self/status")
    plain, loading = kept_mb(["plain", "loading"])
    assert plain >= 20, f"glibc kept {plain} MiB without the setting: the case shows nothing"
    assert loading < 2, f"kept {loading} MiB loading (without the setting {plain})"
