"""The passages of a search corpus: where each one lies in the corpus file, and its text.

A corpus is one file, read as bytes, in one of two formats (docs/search.md#corpus-formats):

* ``jsonl``: one JSON object per line; the passage is the string in ``text_field``. Blank lines are
  passed over; a line that is not valid JSON, or an object without the field (or with a field that
  is not a string), is a ``UserError`` naming the line. A ``null`` or empty field is an empty
  passage (skipped and counted).
* ``text``: passages separated by blank lines (a line with nothing but whitespace), or with
  ``split='line'`` one passage per line; each passage is stripped of surrounding whitespace.

A passage whose bytes are not valid UTF-8 is **skipped and counted** (``non_utf8``), never read with
replacement characters: its offsets would not give back the text that was embedded. ``scan`` returns
the byte span (start, length) of every kept passage; ``passage_text`` reads one span back, so an
index stores only offsets and the corpus file stays the one copy of the text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np

from mixers_jax.errors import UserError

FORMATS = ("jsonl", "text")
SPLITS = ("paragraph", "line")
_BLANK_LINES = re.compile(rb"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*")
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class Scan:
    """The kept passages' byte spans [N, 2] (start, length) int64 and what was passed over."""

    spans: np.ndarray
    sha256: str  # of the whole corpus file
    size: int
    non_utf8: int = 0  # passages skipped: their bytes are not valid UTF-8
    empty: int = 0  # passages skipped: empty after stripping (text) or an empty / null field (jsonl)

    def stats(self) -> dict:
        return {"passages": int(len(self.spans)), "skipped_non_utf8": self.non_utf8,
                "skipped_empty": self.empty, "corpus_bytes": self.size}


def sha256_of(data) -> str:
    """Hex sha256 of ``data`` (bytes or a memory map)."""
    return hashlib.sha256(memoryview(data)).hexdigest()


def format_of(path: str, fmt: str) -> str:
    """``fmt``, or for 'auto' the format the file name says (.jsonl / .json: jsonl; else text)."""
    if fmt == "auto":
        return "jsonl" if path.lower().endswith((".jsonl", ".json")) else "text"
    if fmt not in FORMATS:
        raise UserError(f"unknown corpus format {fmt!r}; choose auto, {' or '.join(FORMATS)}")
    return fmt


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _field_text(line: str, field: str, where: str) -> str:
    """The ``field`` string of one JSONL line ('' for null); UserError naming ``where`` otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with field {field!r}, got "
                        f"{type(obj).__name__}")
    if field not in obj:
        raise UserError(f"{where}: no field {field!r} (fields: {', '.join(list(obj)[:10])}); "
                        "choose it with --text_field")
    value = obj[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
    return value


def _line_spans(data: bytes):
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        yield start, end
        start = end


def _paragraph_spans(data: bytes):
    start = 0
    for m in _BLANK_LINES.finditer(data):
        yield start, m.start()
        start = m.end()
    yield start, len(data)


def _stripped(data: bytes, start: int, end: int) -> tuple[int, int]:
    chunk = data[start:end]
    lead = len(chunk) - len(chunk.lstrip())
    return start + lead, start + len(chunk.rstrip())


def scan(path: str, data: bytes, fmt: str, text_field: str = "text", split: str = "paragraph") -> Scan:
    """The passages of corpus file ``path`` whose bytes are ``data`` (see the module docstring)."""
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose {' or '.join(SPLITS)}")
    begin = len(_BOM) if data.startswith(_BOM) else 0
    spans: list[tuple[int, int]] = []
    non_utf8 = empty = 0
    if fmt == "jsonl":
        for lineno, (start, end) in enumerate(_line_spans(data), start=1):
            start = max(start, begin)
            raw = data[start:end]
            if not raw.strip():
                continue
            line = _utf8(raw)
            if line is None:
                non_utf8 += 1
                continue
            if not _field_text(line, text_field, f"{path}:{lineno}").strip():
                empty += 1
                continue
            spans.append((start, end - start))
    else:
        pieces = _line_spans(data) if split == "line" else _paragraph_spans(data)
        for start, end in pieces:
            start, end = _stripped(data, max(start, begin), end)
            if end <= start:
                continue
            if _utf8(data[start:end]) is None:
                non_utf8 += 1
                continue
            spans.append((start, end - start))
    array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return Scan(array, sha256_of(data), len(data), non_utf8, empty)


def passage_text(data, start: int, length: int, fmt: str, text_field: str = "text") -> str:
    """The passage stored at bytes [start, start + length) of the corpus ``data`` (bytes or a
    memory map): the text itself, or for jsonl the line's ``text_field``."""
    text = bytes(data[start:start + length]).decode("utf-8")
    return _field_text(text, text_field, "corpus line").strip() if fmt == "jsonl" else text
