"""Reading and writing the safetensors format with numpy alone, one tensor at a time.

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the tensors' bytes back to back. The `safetensors` library's numpy backend cannot return bf16 (numpy
has no such dtype), which is how most checkpoints are stored, so this module reads through `np.memmap` and
`ml_dtypes` instead: a tensor is a lazy view of the file, and slicing it reads only the pages the slice
touches, so a device can load just its own shard. Writing streams: the header is computed from the shapes
first, then each tensor is fetched and written, so at most one tensor is in host memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as the reference writer does


class SafetensorsError(ValueError):
    """A safetensors file is malformed or holds something this reader does not support."""


class SafetensorsFile:
    """The tensors of one .safetensors file as lazy, read-only numpy views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(size))
            except (ValueError, UnicodeDecodeError):
                raise SafetensorsError(f"{self.path}: not a safetensors file (unreadable JSON header)") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._start = 8 + size
        self._data = np.memmap(self.path, np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """The file's dtype name for `name` (F32, BF16, ...)."""
        return self._entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a view of the file: nothing is read until it (or a slice of it) is used."""
        entry = self._entries[name]
        if entry["dtype"] not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name} has dtype {entry['dtype']}; supported: "
                                   + ", ".join(DTYPES))
        begin, end = entry["data_offsets"]
        raw = self._data[self._start + begin:self._start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_safetensors(path: str | Path, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes the tensors `specs` = [(name, shape, dtype)] in that order, calling fetch(name) for each.

    fetch must return an array of exactly the declared shape and dtype (checked: the header is already
    written when it is called).
    """
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in specs:
            array = fetch(name)
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise SafetensorsError(f"tensor {name}: got {array.dtype}{list(array.shape)}, declared "
                                       f"{np.dtype(dtype)}{list(shape)}")
            np.ascontiguousarray(array).tofile(f)  # raw bytes, no second copy
