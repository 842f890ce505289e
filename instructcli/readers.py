"""Where rows come from: JSONL (through jsonlines), CSV/TSV, and anything `datasets` reads (parquet, JSON, arrow
files, a `save_to_disk` directory, a hub dataset id from the local cache), each row with the place a problem
is reported at (`file:line` for line formats, `file: row N` for the others).

data.py turns these raw rows into validated records; this module only reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from instructcli.errors import DataError, InstructError

LINE_FORMATS = {".jsonl": "JSONL", ".ndjson": "JSONL", ".csv": "CSV", ".tsv": "TSV"}
DATASET_FILES = {".parquet": "parquet", ".json": "json", ".arrow": "arrow"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
Where = int | str  # a line number, or "row N"


@dataclass
class Rows:
    """An opened source: its name in messages, a content digest, what it is, and its rows."""

    name: str
    sha256: str
    format: str  # JSONL, CSV, TSV, parquet, json, arrow, save_to_disk, hub
    rows: Iterator[tuple[Where, dict | DataError]]


def type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "integer" if isinstance(v, int) else "number" if isinstance(v, float) else type(v).__name__
    )


def open_rows(path: str, split: str = "train") -> Rows:
    """Open one source by what it is: `-` (JSONL on stdin), a file by its suffix (no suffix: JSONL), a
    `save_to_disk` directory, or a hub dataset id (`org/name`, from the local cache: offline)."""
    path = str(path)
    if path == "-":
        data = sys.stdin.buffer.read()
        return Rows("<stdin>", hashlib.sha256(data).hexdigest(), "JSONL", jsonl_rows("<stdin>", data))
    suffix = Path(path).suffix.lower()
    if os.path.isdir(path):
        return _dataset(path, split, "save_to_disk")
    if not os.path.exists(path):
        if HUB_ID.fullmatch(path) and suffix not in LINE_FORMATS and suffix not in DATASET_FILES:
            return _dataset(path, split, "hub")
        raise InstructError(f"{path}: no such file", 2)
    if suffix in DATASET_FILES:
        return _dataset(path, split, DATASET_FILES[suffix])
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if suffix in (".csv", ".tsv"):
        return Rows(path, digest, LINE_FORMATS[suffix], table_rows(path, data, "\t" if suffix == ".tsv" else ","))
    return Rows(path, digest, "JSONL", jsonl_rows(path, data))


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InstructError(f"{path}: cannot read: {e.strerror}", 2) from None


# ------------------------------------------------------------------------------------------- JSONL
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _loads(line: str):
    return json.loads(line, parse_constant=_reject_constant)


def jsonl_rows(name: str, data: bytes) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, object or the error for that line) through jsonlines; blank lines are skipped, a UTF-8
    BOM and CRLF line ends are accepted, NaN/Infinity are not JSON."""
    import jsonlines

    at = [0]

    def lines():
        for i, raw in enumerate(data.split(b"\n"), start=1):
            at[0] = i
            yield raw.rstrip(b"\r")

    reader = jsonlines.Reader(lines(), loads=_loads)
    while True:
        try:
            obj = reader.read(skip_empty=True, allow_none=True)
        except EOFError:
            return
        except jsonlines.InvalidLineError as e:
            cause = e.__cause__
            if isinstance(cause, UnicodeDecodeError):
                yield e.lineno, DataError(name, e.lineno, None, f"invalid UTF-8 at byte {cause.start}")
            else:
                yield e.lineno, DataError(name, e.lineno, None, f"invalid JSON: {cause or e}")
            continue
        except RecursionError:
            yield at[0], DataError(name, at[0], None, "invalid JSON: nested too deeply")
            continue
        if not isinstance(obj, dict):
            yield at[0], DataError(name, at[0], None, f"expected a JSON object, got {type_name(obj)}")
            continue
        yield at[0], obj


# ---------------------------------------------------------------------------------------- CSV / TSV
def table_rows(name: str, data: bytes, delimiter: str) -> Iterator[tuple[int, dict | DataError]]:
    """Rows of a CSV/TSV file with a header line, as (line number, {column: text}); values stay strings."""
    import csv
    import io

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = 1 + data[:e.start].count(b"\n")
        yield line, DataError(name, line, None, f"invalid UTF-8 at byte {e.start}")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for row in reader:
            if None in row:  # more cells than the header has
                yield reader.line_num, DataError(name, reader.line_num, None,
                                                 f"{len(reader.fieldnames) + len(row[None])} cells, the header has "
                                                 f"{len(reader.fieldnames)}")
                continue
            if any(v not in (None, "") for v in row.values()):
                yield reader.line_num, {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        yield reader.line_num, DataError(name, reader.line_num, None, f"invalid {kind}: {e}")


# ---------------------------------------------------------------------------------------- datasets
def _dataset(path: str, split: str, kind: str) -> Rows:
    """A `datasets.Dataset` from a parquet/JSON/arrow file, a save_to_disk dir or the hub cache."""
    import datasets

    datasets.disable_progress_bars()  # our own lines only
    try:
        if kind == "save_to_disk":
            if not any((Path(path) / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                raise InstructError(f"{path}: is a directory, expected a data file or a `save_to_disk` dataset dir", 2)
            ds = datasets.load_from_disk(path)
        elif kind == "hub":
            ds = _hub(path, split)
        elif kind == "parquet":
            ds = datasets.Dataset.from_parquet(path)
        elif kind == "arrow":
            ds = datasets.Dataset.from_file(path)
        else:
            ds = datasets.Dataset.from_json(path)
    except InstructError:
        raise
    except Exception as e:  # noqa: BLE001 - a file datasets cannot read: one line, not its traceback
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InstructError(f"{path}: cannot read as {kind}: {first}", 2) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InstructError(f"{path}: no split {split!r} (it has {', '.join(ds)}); choose one with --split", 2)
        ds = ds[split]

    def rows():
        i = 0
        for batch in ds.iter(batch_size=1024):  # column batches: several times faster than row by row
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                i += 1
                # a column a row has no value in reads as None (parquet's schema is the union): absent, not null
                yield f"row {i}", {k: v for k, v in zip(keys, values) if v is not None}

    return Rows(path, ds._fingerprint, kind, rows())


def _hub(repo: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 - offline, a dataset not in the cache fails in several ways
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InstructError(f"{repo}: no such file, and not a hub dataset in the local cache ({why[:160]}); where "
                            f"there is a network, fetch it once with: python -c \"import datasets; "
                            f"datasets.load_dataset('{repo}')\"", 2) from None
