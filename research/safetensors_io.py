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
import math
import os
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
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", head)
            if 8 + size > file_size:  # checked before reading: a garbage length would allocate that much
                raise SafetensorsError(f"{self.path}: not a safetensors file (header length {size} is past the "
                                       f"end of the file, which has {file_size} bytes)")
            try:
                header = json.loads(f.read(size))
            except ValueError:  # UnicodeDecodeError included
                raise SafetensorsError(f"{self.path}: not a safetensors file (unreadable JSON header)") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: not a safetensors file (the header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._start = 8 + size
        self._check_entries(file_size)
        self._data = np.memmap(self.path, np.uint8, mode="r") if header else None

    def _check_entries(self, file_size: int) -> None:
        """Each tensor's entry is well formed and its bytes lie inside the file, so a damaged or truncated
        file fails here naming the tensor, not later as a reshape of too few bytes."""
        for name, entry in self._entries.items():
            if not _well_formed(entry):
                raise SafetensorsError(f"{self.path}: not a safetensors file (the header entry of tensor {name!r} "
                                       "lacks a dtype, a shape or data_offsets [begin, end])")
            begin, end = entry["data_offsets"]
            if entry["dtype"] in DTYPES:
                needed = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
                if end - begin != needed:
                    raise SafetensorsError(f"{self.path}: tensor {name!r} is {entry['dtype']}{entry['shape']}, "
                                           f"{needed} bytes, but its data_offsets [{begin}, {end}) hold {end - begin}")
        cut = [(entry["data_offsets"], name) for name, entry in self._entries.items()
               if self._start + entry["data_offsets"][1] > file_size]
        if cut:
            (begin, end), name = min(cut)  # the first tensor the file's end cuts into
            raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} needs bytes [{self._start + begin}, "
                                   f"{self._start + end}) but the file has {file_size}")

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


def _well_formed(entry: object) -> bool:
    """{"dtype": str, "shape": [n >= 0, ...], "data_offsets": [begin, end]} with 0 <= begin <= end."""
    def count(n: object) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(map(count, shape)) and isinstance(offsets, list) and len(offsets) == 2
            and all(map(count, offsets)) and offsets[0] <= offsets[1])


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
