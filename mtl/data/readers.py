"""Readers for the file formats a task spec can name: csv, jsonl, conll, folder-per-class.

Each reader yields `(origin, record)` pairs, where `origin` is "path:line" so that every later
complaint about a record (an unknown label, a broken tag sequence) can name the file and line.
Sequence-task records hold the requested columns; CoNLL records hold `tokens` and `tags`.
Malformed input raises `MtlError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtl.errors import MtlError

Record = dict[str, Any]


def decode(path: Path, encoding: str, fallback: str | None = None) -> tuple[str, bool]:
    """The text of `path` and whether `fallback` was needed to decode it.

    A leading byte-order mark (Excel writes one into its "CSV UTF-8") is dropped: it would
    otherwise stick to the first column's name or make the first JSON line invalid.
    """
    data = path.read_bytes()
    try:
        return data.decode(encoding).removeprefix("\ufeff"), False
    except UnicodeDecodeError as e:
        if fallback is not None:
            return data.decode(fallback), True
        line = data.count(b"\n", 0, e.start) + 1
        raise MtlError(
            f"{path}:{line}: not valid {encoding} (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "declare the file's encoding with source.encoding (or source.fallback_encoding)"
        ) from None
    except LookupError:
        raise MtlError(f"{path}: unknown encoding {encoding!r}") from None


def read_csv(path: Path, columns: Sequence[str], text: str, delimiter: str = ",") -> Iterator[tuple[str, Record]]:
    """`columns` of each row of a delimited file's `text` (source.delimiter, a comma by default),
    found by the header; a quoted field may span lines, and the origin names the line its row
    starts on."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        raise MtlError(f"{path}:1: malformed csv header ({e})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise MtlError(f"{path}: column(s) {missing} not found; the header has {header}")
    previous_end = reader.line_num  # rows can span lines (quoted newlines): track where each starts
    try:
        for row in reader:
            origin = f"{path}:{previous_end + 1}"
            previous_end = reader.line_num
            if None in row or any(row[c] is None for c in columns):
                raise MtlError(f"{origin}: row does not have the header's {len(header)} fields")
            yield origin, {c: row[c] for c in columns}
    except csv.Error as e:  # name the line the bad row starts on: an unclosed quote runs to the end of the file
        raise MtlError(f"{path}:{previous_end + 1}: malformed csv ({e})") from None


def parse_json_line(line: str, where: str) -> Any:
    """One line of JSON Lines; invalid JSON is an error naming `where` ("file:line") and the column.

    The line ending is dropped first, so that the column counts along this line.
    """
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise MtlError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: Path, columns: Sequence[str], text: str) -> Iterator[tuple[str, Record]]:
    """`columns` of each JSON object, one a line; blank lines are skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        obj = parse_json_line(line, f"{path}:{number}")
        if not isinstance(obj, dict):
            raise MtlError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        missing = [c for c in columns if c not in obj]
        if missing:
            raise MtlError(f"{path}:{number}: missing key(s) {missing}; the object has {sorted(obj)}")
        yield f"{path}:{number}", {c: obj[c] for c in columns}


def read_conll(path: Path, text: str, delimiter: str | None = None) -> Iterator[tuple[str, Record]]:
    """One token per line, its tag in the last field; blank (or whitespace-only) lines end a sentence.

    `-DOCSTART-` lines are skipped. A line with a single field is malformed.
    """
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if tokens:
                yield f"{path}:{start}", {"tokens": tokens, "tags": tags}
                tokens, tags = [], []
            continue
        fields = line.split(delimiter) if delimiter else line.split()
        fields = [f for f in fields if f.strip()] if delimiter else fields
        if len(fields) < 2:
            raise MtlError(f"{path}:{number}: malformed CoNLL line {line!r}: expected a token and a tag")
        if fields[0] == "-DOCSTART-":
            continue
        if not tokens:
            start = number
        tokens.append(fields[0].strip())
        tags.append(fields[-1].strip())
    if tokens:
        yield f"{path}:{start}", {"tokens": tokens, "tags": tags}


def folder_files(root: Path) -> list[tuple[str, Path]]:
    """(class, file) pairs: every regular file in each immediate subdirectory of `root`."""
    if not root.is_dir():
        raise MtlError(f"{root}: format 'folder' needs a directory with one subdirectory per class")
    pairs = [
        (label_dir.name, f)
        for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        for f in sorted(label_dir.iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]
    if not pairs:
        raise MtlError(f"{root}: no class subdirectories with files")
    return pairs
