"""Wheels for mpllama's GPU checks (benchmarks/gpu_check.sh) on a CUDA machine that cannot
reach PyPI but has its own torch, transformers, numpy, pyyaml and the like: the packages
mpllama needs beyond those, for that machine's Python, in one folder.

Ray's wheel is slimmed: its Java jars and the dashboard's web build, neither of which
mpllama uses, are dropped (79 MB -> 45 MB), so the folder travels where a transfer is
limited in size. Its RECORD loses their lines, so pip installs it as any other wheel.

    python benchmarks/gpu_wheels.py OUT [--python 3.12]

and on the GPU machine: WHEELS=OUT benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# mpllama's own pins (pyproject.toml), and what they need that a CUDA image lacks.
BINARY = ["ray==2.60.0", "llguidance==1.9.1", "rpds-py"]
PURE = ["jsonschema", "jsonschema-specifications", "referencing"]
SOURCE_ONLY = ["fairscale==0.4.13"]  # an sdist: built into a wheel here
RAY_DROPPED = ("ray/jars/", "ray/dashboard/client/build/")
# pip matches a manylinux tag exactly: name each glibc a wheel may be built for.
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(out: Path, python: str) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    common = ["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    pip(*common, "--python-version", python, "--implementation", "cp", *platforms, *BINARY)
    pip(*common, *PURE)
    pip("wheel", "-q", "--no-deps", "-w", str(out), *SOURCE_ONLY)


def slim(wheel: Path, dropped: tuple[str, ...] = RAY_DROPPED) -> None:
    """Rewrite ``wheel`` without the files under ``dropped``, RECORD to match."""
    with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as tmp:
        slimmed = Path(tmp.name)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(dropped):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(dropped)).encode()
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    slimmed.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder for the wheels")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (3.12)")
    opts = parser.parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    download(opts.out, opts.python)
    for wheel in opts.out.glob("ray-*.whl"):
        slim(wheel)
    total = 0
    for wheel in sorted(opts.out.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"  {wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print(f"  {total / 2**20:6.1f} MiB in all, in {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
