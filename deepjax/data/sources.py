"""Real-data sources: plain text files and ArrayRecord files, as grain random-access sources.

Elements are dicts: {"text": str} for text, {"tokens": int32 array} for pre-tokenized records,
always with "domain": -1 (unknown) and "origin" (file and line or record, named in errors).
"""

import bisect
import glob
import os
from collections.abc import Sequence

import grain
import numpy as np

UNKNOWN_DOMAIN = -1


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Sorted files matching one glob or a list of globs; FileNotFoundError if none match."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  paths = []
  for pattern in patterns:
    pattern = os.path.expanduser(os.fspath(pattern))
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
      raise FileNotFoundError(f"no files match {pattern!r}")
    paths.extend(matches)
  for path in paths:
    if not os.access(path, os.R_OK):
      raise PermissionError(f"cannot read {path!r}")
  return paths


def _decode(data: bytes, origin: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{origin}: not valid UTF-8 ({e})") from e


class TextFileSource:
  """Documents from plain UTF-8 text files: one per file, or with `lines=True` one per
  non-empty (not only whitespace) line.

  With `lines=True` the files are scanned once at construction and only line offsets are kept;
  lines are read back from disk on access.
  """

  def __init__(self, patterns, *, lines: bool = False):
    self.paths = expand_paths(patterns)
    self.lines = lines
    if lines:
      # One entry per document: (file index, byte offset, byte length, 1-based line number).
      index = []
      for f, path in enumerate(self.paths):
        offset = 0
        with open(path, "rb") as fh:
          for number, line in enumerate(fh, 1):
            if line.strip():
              index.append((f, offset, len(line.rstrip(b"\r\n")), number))
            offset += len(line)
      self._index = np.array(index, np.int64).reshape(-1, 4)

  def __len__(self) -> int:
    return len(self._index) if self.lines else len(self.paths)

  def __getitem__(self, i: int) -> dict:
    if self.lines:
      f, offset, length, number = (int(x) for x in self._index[i])
      origin = f"{self.paths[f]}:{number}"
      with open(self.paths[f], "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    else:
      origin = self.paths[i]
      with open(origin, "rb") as fh:
        data = fh.read()
    return {"text": _decode(data, origin), "domain": UNKNOWN_DOMAIN, "origin": origin}

  def __repr__(self) -> str:
    return f"TextFileSource({len(self.paths)} files, lines={self.lines})"


class ArrayRecordSource:
  """Records of ArrayRecord files: UTF-8 text, or with `pretokenized=True` token ids stored as
  little-endian int32 bytes (`np.asarray(ids, "<i4").tobytes()`).

  Pre-tokenized records hold the document's tokens without BOS/EOS: the pipeline adds them, as
  for text. Ids are checked against the model's vocabulary in the pipeline, when met.
  """

  def __init__(self, patterns, *, pretokenized: bool = False):
    from array_record.python.array_record_module import ArrayRecordReader  # optional package

    self.paths = expand_paths(patterns)
    self.pretokenized = pretokenized
    counts = []
    for path in self.paths:
      try:
        reader = ArrayRecordReader(path)
        counts.append(reader.num_records())
        reader.close()
      except Exception as e:  # array_record raises RuntimeError/ValueError with C++ status text
        raise ValueError(f"{path!r} is not a readable ArrayRecord file: {e}") from e
    self._ends = np.cumsum(counts).tolist()   # record i lives in file bisect_right(ends, i)
    self._records = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._records)

  def _origin(self, i: int) -> str:
    f = bisect.bisect_right(self._ends, i)
    return f"{self.paths[f]} record {i - (self._ends[f - 1] if f else 0)}"

  def __getitem__(self, i: int) -> dict:
    record = self._records[i]
    if not self.pretokenized:
      return {"text": _decode(record, self._origin(i)), "domain": UNKNOWN_DOMAIN,
              "origin": self._origin(i)}
    if len(record) % 4:
      raise ValueError(f"{self._origin(i)}: {len(record)} bytes is not a whole number of int32 "
                       "tokens; was it written as text (pretokenized=False)?")
    return {"tokens": np.frombuffer(record, "<i4").astype(np.int32), "domain": UNKNOWN_DOMAIN,
            "origin": self._origin(i)}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files, pretokenized={self.pretokenized})"
