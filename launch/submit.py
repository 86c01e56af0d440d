"""Entry for ``ray submit``: run a YAML job on the cluster made by ``ray up``.

    ray submit launch/cluster.yaml launch/submit.py -- configs/jobs/X.yaml [--set k=v ...]

``ray submit`` copies this script to the head node and runs it there, so the job path is
read on the head: relative paths are tried from the current folder, then from ~/mpllama
(where launch/cluster.yaml syncs the repo). It joins the running cluster
(``parallel.ray_address=auto``, unless the command line sets another) and runs the same
job runner as ``mpllama run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mpllama.cli import main

REPO_ON_CLUSTER = Path.home() / "mpllama"  # file_mounts target in launch/cluster.yaml


def build_argv(argv: list[str]) -> list[str]:
    """``mpllama run`` arguments for this script's command line."""
    if not argv or argv[0] in ("-h", "--help"):
        return ["run", "--help"]
    job, rest = argv[0], argv[1:]
    if not Path(job).exists() and (REPO_ON_CLUSTER / job).exists():
        job = str(REPO_ON_CLUSTER / job)
    if not any(a.startswith("parallel.ray_address=") for a in rest):
        rest = ["--set", "parallel.ray_address=auto", *rest]
    return ["run", job, *rest]


if __name__ == "__main__":
    sys.exit(main(build_argv(sys.argv[1:])))
