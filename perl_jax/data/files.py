"""Records of a data file, each a dict with its 1-based position, and the field checks every reader shares.

Files: JSON lines (.jsonl / .json / any other name, one object a line, optionally .gz), or the tables Hugging Face
`datasets` writes: Parquet (.parquet, `to_parquet`) and Arrow (.arrow, the shards `save_to_disk` writes), or a
folder of such files (read in name order, rows numbered across them). Bad input raises
DataError("FILE:LINE: field 'NAME': what is wrong"); a parser raises FieldError and `read_records` adds file and
line. Nothing is skipped unless the caller asks with skip_invalid=True, and then every skip is logged.
"""
import gzip
import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterator

from perl_jax.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")


class FieldError(Exception):
  """Raised inside a record parser; the reader adds file and line."""

  def __init__(self, field, problem):
    super().__init__(field, problem)
    self.field, self.problem = field, problem


def _open_text(path):
  if str(path).endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, "rt", encoding="utf-8")


def iter_lines(path) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, text) for each non-blank line of a text or .gz file."""
  try:
    with _open_text(path) as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          yield line_no, line
  except UnicodeDecodeError as e:
    raise DataError(path, None, None, f"not UTF-8 text ({e.reason})") from None
  except gzip.BadGzipFile as e:
    raise DataError(path, None, None, f"not a gzip file ({e})") from None


def _table_batches(path: pathlib.Path):
  """pyarrow record batches of one Parquet or Arrow (IPC stream, as `datasets` writes, or IPC file) table."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    if path.suffix == ".parquet":
      yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
      return
    with pa.memory_map(str(path), "r") as source:
      try:
        reader = pa.ipc.open_stream(source)
      except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
      yield from reader
  except (pa.ArrowException, OSError) as e:
    raise DataError(path, None, None, f"not a readable {path.suffix[1:]} table ({e})") from None


def table_files(path) -> list[pathlib.Path]:
  """The table files of `path`: itself, or a folder's .parquet / .arrow files in name order."""
  p = pathlib.Path(path)
  if not p.is_dir():
    return [p]
  files = sorted(f for f in p.iterdir() if f.suffix in TABLE_SUFFIXES)
  if not files:
    raise DataError(path, None, None, "a folder without .parquet or .arrow files")
  return files


def iter_rows(path) -> Iterator[tuple[int, str | dict]]:
  """(1-based row, raw): a JSON line's text (parsed by the caller, so a malformed line is one record's error)
  or a table row's dict."""
  p = pathlib.Path(path)
  if not p.is_dir() and p.suffix not in TABLE_SUFFIXES:
    yield from iter_lines(p)
    return
  row = 0
  for f in table_files(p):
    for batch in _table_batches(f):
      for record in batch.to_pylist():
        row += 1
        yield row, record


def loads_field(text: str, field: str | None, kind: type) -> Any:
  """json.loads with the reader's error: malformed JSON or a value of the wrong type, naming the field."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise FieldError(field, f"malformed JSON: {e.msg} at column {e.colno}") from None
  if not isinstance(value, kind):
    name = {dict: "object", list: "list"}.get(kind, kind.__name__)
    raise FieldError(field, f"expected a JSON {name}, got {type(value).__name__}")
  return value


def check_exists(path) -> None:
  """DataError "no such file" now, before any model is loaded."""
  if not (os.path.isfile(path) or os.path.isdir(path)):
    raise DataError(path, None, None, "no such file")


def read_records(path, parse: Callable[[dict], dict], skip_invalid: bool, skipped: list | None) -> Iterator[dict]:
  """Checks the file exists now, then lazily parses each record with `parse`.

  With skip_invalid, bad records (not bad files) are left out: listed in `skipped` (the caller logs one summary,
  `log_skipped`), or logged one by one when `skipped` is None.
  """
  check_exists(path)

  def generate():
    for line_no, raw in iter_rows(path):
      try:
        example = parse(raw if isinstance(raw, dict) else loads_field(raw, None, dict))
      except FieldError as e:
        error = DataError(path, line_no, e.field, e.problem)
        if not skip_invalid:
          raise error from None
        if skipped is None:
          logging.warning("skipping invalid record: %s", error)
        else:
          skipped.append(str(error))
        continue
      yield example

  return generate()


def log_skipped(path, skipped: list) -> None:
  """One warning line for the records `read_records` skipped: their count and the first one."""
  if skipped:
    logging.warning("%s: skipped %d invalid records (skip_invalid=True), the first: %s", path, len(skipped),
                    skipped[0])


def get_field(record: dict, field: str, kind=str, name: str | None = None) -> Any:
  name = name or field
  if field not in record or record[field] is None:
    raise FieldError(name, "missing")
  value = record[field]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise FieldError(name, f"expected {kind.__name__}, got {type(value).__name__}")
  return value


def nonempty(text: str, name: str) -> str:
  text = text.strip()
  if not text:
    raise FieldError(name, "empty response")
  return text


def check_pair(example: dict) -> dict:
  if example["chosen"] == example["rejected"]:
    raise FieldError("rejected", "identical to 'chosen'")
  return example


def binary_choice(value, name: str) -> int:
  if isinstance(value, bool) or value not in (0, 1):
    raise FieldError(name, f"must be 0 or 1, got {value!r}")
  return int(value)
