"""A torch.save shard's index read without torch and without its tensors: the names and
shapes of what it holds, from the pickle inside the zip file alone (milliseconds even for
a 70B shard). ``checkpoint.read_shapes`` builds on it, and falls back to torch's own
weights-only loader where a shard is not a plain state dict of tensors.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any


class _Tensor:
    """A tensor in a shard's index: its shape; its bytes are never read."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _rebuild_tensor(_storage: Any, _offset: int, size: tuple[int, ...], *_rest: Any) -> _Tensor:
    return _Tensor(tuple(size))


def _rebuild_parameter(data: _Tensor, *_rest: Any) -> _Tensor:
    return data


# What torch.save writes for a state dict of tensors. Anything else (a subclass, a
# quantized tensor, or a pickle that would run code) sends the shard to torch's own
# weights-only loader, which accepts or refuses it as a rank would.
_INDEX_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_STORAGE_TYPE = re.compile(r"[A-Za-z0-9]+Storage")


class _NotPlain(Exception):
    pass


class _IndexReader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return _INDEX_GLOBALS[module, name]
        if module == "torch" and _STORAGE_TYPE.fullmatch(name):
            return name  # a storage type, only named
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> None:
        return None  # ("storage", type, key, location, numel): the bytes stay unread


def _plain_index(path: Path) -> dict[str, Any]:
    """The unpickled index of a zip-format torch.save file, tensors as _Tensor."""
    with zipfile.ZipFile(path) as archive:
        (entry,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        with archive.open(entry) as pickled:
            return _IndexReader(pickled).load()


def index_shapes(path: Path) -> dict[str, tuple[int, ...] | None] | None:
    """Each key of the shard's state dict and its shape (None for a value that is not a
    tensor), from the pickled index alone; None where the file is not a plain zip-format
    state dict of tensors (truncated, corrupt, legacy format, or carrying Python objects),
    for torch's loader to judge."""
    try:
        index = _plain_index(path)
    except Exception:  # noqa: BLE001  (any failure: let torch's loader judge the file)
        return None
    if not isinstance(index, dict) or not all(isinstance(k, str) for k in index):
        return None
    return {k: v.shape if isinstance(v, _Tensor) else None for k, v in index.items()}
