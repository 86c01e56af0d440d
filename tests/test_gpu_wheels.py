"""benchmarks/gpu_wheels.py's slimming of Ray's wheel, on a small wheel of the same shape:
the dropped folders gone from the archive and from its RECORD, everything else as it was."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import gpu_wheels  # noqa: E402

KEPT = {
    "ray/__init__.py": b"version = '2.60.0'\n",
    "ray/_raylet.so": b"\x7fELF" + bytes(100),
    "ray/dashboard/modules/x.py": b"# the dashboard's server side stays\n",
}
DROPPED = {
    "ray/jars/ray_dist.jar": b"PK" + bytes(200),
    "ray/dashboard/client/build/static/js/main.js": b"console.log(1)\n",
}


def test_slim_drops_the_java_jars_and_the_dashboard_build(tmp_path: Path) -> None:
    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in {**KEPT, **DROPPED}.items())
    record += "ray-2.60.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in {**KEPT, **DROPPED}.items():
            z.writestr(name, data)
        z.writestr("ray-2.60.0.dist-info/RECORD", record)
    gpu_wheels.slim(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert z.testzip() is None
        names = set(z.namelist())
        assert names == set(KEPT) | {"ray-2.60.0.dist-info/RECORD"}
        assert all(z.read(name) == data for name, data in KEPT.items())
        listed = {
            line.split(",")[0]
            for line in z.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()
        }
    assert listed == names
    assert list(tmp_path.iterdir()) == [wheel]  # no temporary file left beside it
