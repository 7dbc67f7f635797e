"""Streaming safetensors reading and writing with numpy memory maps.

The `safetensors` package's numpy backend has no bfloat16 or float8; DeepSeek-V3's hub weights
are float8_e4m3 and most checkpoints bfloat16. This reads any tensor lazily (a memory-mapped
view, nothing loaded until used) and writes tensors one at a time, so neither direction holds a
second copy of a model's weights. Format: u64 header length, JSON header, raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
  """Lazy, read-only view of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self._entries = header
    self._data_start = 8 + n
    size = os.path.getsize(path)
    for name, entry in header.items():
      if entry["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
      begin, end = entry["data_offsets"]
      if self._data_start + end > size:
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    self._map = np.memmap(path, dtype=np.uint8, mode="r") if header else None

  def keys(self) -> list[str]:
    return list(self._entries)

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    begin, end = entry["data_offsets"]
    raw = self._map[self._data_start + begin:self._data_start + end]
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray]) -> None:
  """Writes tensors named in `specs` (name, shape, dtype), asking `produce(name)` for each one
  only when it is written. The file appears under `path` only once complete."""
  header, offset = {}, 0
  specs = list(specs)
  for name, shape, dtype in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      array = np.ascontiguousarray(produce(name), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name!r}: produced shape {array.shape}, expected {shape}")
      f.write(array.tobytes())
  os.replace(tmp, path)
