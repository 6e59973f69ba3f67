"""Reading local JSONL / parquet rows, with errors that name file, row and field.

Every source format (UltraChat, UltraFeedback, ranked JSONL) is read through
`iter_rows`, and every per-row problem is raised as `DataError` by the schema
converters. `BadRowPolicy` decides between raising and skipping-and-counting,
so a bad row is never dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)
MAX_LOGGED_ROWS = 5  # bad rows logged one by one (and kept in BadRowPolicy.examples) before only counting


class DataError(ValueError):
    """A bad input row or file; the message names file, row and field.

    `row` is the 0-based index; the message counts from 1, as an editor does (in a JSONL file,
    row N is line N)."""

    def __init__(self, file: str, row: int | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = file, row, field, problem
        where = file if row is None else f"{file}: row {row + 1}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass
class BadRowPolicy:
    """Raise on the first bad row, or (skip_bad_rows=True) skip it and count why."""

    skip_bad_rows: bool = False
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)  # First few messages.

    def handle(self, err: DataError) -> None:
        if not self.skip_bad_rows:
            raise err
        self.skipped[f"{err.field}: {err.problem}"] += 1
        # The first few rows one line each; the rest only in the counts (`summary`), which the
        # builder logs once per split: a large file with many bad rows is not a screen of warnings.
        if len(self.examples) < MAX_LOGGED_ROWS:
            self.examples.append(str(err))
            log.warning("Skipping bad row: %s", err)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """'N bad rows skipped (reason: count, ...)', most frequent reason first."""
        reasons = ", ".join(f"{why}: {n}" for why, n in self.skipped.most_common())
        return f"{self.n_skipped} bad rows skipped ({reasons})"


def _suffix(path: str) -> str:
    for ext in (".jsonl", ".json", ".parquet"):
        if path.endswith(ext):
            return ext
    raise DataError(path, None, None, "unknown file type; expected .jsonl, .json or .parquet")


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files given directly or found (sorted) in given folders; errors if none exist."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith((".jsonl", ".json", ".parquet")))
            if not found:
                raise DataError(p, None, None, "folder holds no .jsonl/.json/.parquet files")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(p, None, None, "file not found")
    if not out:
        raise DataError("<no paths>", None, None, "no input files given")
    return out


def files_fingerprint(paths: Sequence[str]) -> str:
    """Cheap identity of the input files (path, size, mtime) for cache naming."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def iter_rows(paths: str | Sequence[str]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yields (file, row index starting at 0, row dict) over all files in order.

    A line that is not valid JSON (or not an object) is a `DataError` for that row;
    the caller decides through `BadRowPolicy` whether to skip it.
    """
    for path in expand_paths(paths):
        ext = _suffix(path)
        if ext == ".parquet":
            import pyarrow.parquet as pq  # Local import: only parquet users pay for it.

            table = pq.read_table(path)
            for i, row in enumerate(table.to_pylist()):
                yield path, i, row
            continue
        with open(path, "rb") as f:  # bytes: a row that is not UTF-8 is that row's error, not the file's
            if ext == ".json":  # A single JSON list of rows.
                try:
                    rows = json.loads(f.read().decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(path, None, None, f"not UTF-8 text: {e}") from None
                except json.JSONDecodeError as e:
                    raise DataError(path, None, None, f"invalid JSON: {e}") from e
                if not isinstance(rows, list):
                    raise DataError(path, None, None, "a .json file must hold a list of row objects")
                for i, row in enumerate(rows):
                    yield path, i, row
                continue
            for i, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield path, i, _BadJson(f"not UTF-8 text: {e}")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = _BadJson(str(e))
                yield path, i, row


class _BadJson(dict):
    """Marks an unparsable line so the converter can raise a row-level DataError."""

    def __init__(self, msg: str):
        super().__init__()
        self.msg = msg


def require_str(file: str, row: int, obj: Any, field: str, *, where: str | None = None) -> str:
    """obj[field] as a non-empty string, or a DataError naming the field."""
    name = where or field
    if isinstance(obj, _BadJson):
        raise DataError(file, row, None, f"invalid JSON line: {obj.msg}")
    if not isinstance(obj, dict):
        raise DataError(file, row, name, f"expected an object, got {type(obj).__name__}")
    if field not in obj or obj[field] is None:
        raise DataError(file, row, name, "missing")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(file, row, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(file, row, name, "empty")
    return value


def require_number(file: str, row: int, value: Any, field: str) -> float:
    """A finite float from a number or numeric string, or a DataError."""
    if isinstance(value, bool) or value is None:
        raise DataError(file, row, field, f"not a number: {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(file, row, field, f"not a number: {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise DataError(file, row, field, f"not a finite number: {value!r}")
    return out
