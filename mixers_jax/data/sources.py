"""Text sources: files, folders, globs (plain text, JSONL, Parquet); the embedded corpus by name.

Everything here returns plain Python strings, one per document, in a deterministic order, so that the
hash split (:func:`split_documents`), the tokenizer and the packer downstream are reproducible.

Decisions worth knowing:

* **Bytes that are not UTF-8** (in text and JSONL files, and Parquet byte strings) are decoded as with
  ``errors='replace'``: each invalid sequence becomes U+FFFD. This is lossy, but it never fails on a
  stray Latin-1 byte and what the model sees is exactly what bits per byte are measured on (the UTF-8 of
  the decoded text). The replaced bytes are counted (``replaced_bytes`` in the data statistics). A UTF-8
  byte-order mark at the start of a file is dropped.
* **Binary files are refused** (one line naming the file, "looks binary"): a text or JSONL file with a
  NUL byte in its first 8 KiB (no text format has one; executables, images and archives do), or with
  more than 1% of its bytes not valid UTF-8 (and at least 8 of them; a few stray bytes pass). A text
  file in another encoding (Latin-1 prose has a few percent of such bytes) is refused the same way:
  convert it to UTF-8 first (``iconv -f latin1 -t utf-8``).
* **Plain-text files** are one document each, except that a file larger than 8 KB is cut at blank-line
  paragraph boundaries into pieces of roughly 4 KB (2-8 KB), so that the hash split can hold out part of
  a single-file corpus such as tinyshakespeare.txt. Paragraphs longer than 8 KB are cut at line breaks,
  and lines longer than 8 KB at whitespace.
* **Ordering**: the comma-separated entries of ``data.source`` in the order given; inside an entry (a
  folder or a glob) files sorted by path; inside a file, file order. ``data.max_documents > 0`` keeps the
  first N non-empty documents in that order (later files are not read at all).
* **Documents that are empty or whitespace-only are dropped.**
* **The embedded corpus** (``data.source=embedded``) is :mod:`mixers_jax.data.embedded`.
"""
from __future__ import annotations

import codecs
import dataclasses
import glob as _glob
import hashlib
import json
import os
import threading
from typing import Iterator

from mixers_jax.config import field as _field
from mixers_jax.errors import UserError
from mixers_jax.data.chunking import chunk_text
from mixers_jax.data.embedded import embedded_corpus
from mixers_jax.fileio import read_bytes

FORMATS = ("auto", "text", "jsonl", "parquet")
_TEXT_EXT = (".txt", ".md")
_JSONL_EXT = (".jsonl", ".json")
_PARQUET_EXT = (".parquet",)
_EXTENSIONS = {
    "auto": _TEXT_EXT + _JSONL_EXT + _PARQUET_EXT,
    "text": _TEXT_EXT,
    "jsonl": _JSONL_EXT,
    "parquet": _PARQUET_EXT,
}

# Binary detection: a NUL byte in the first _NUL_WINDOW bytes, or more than _MAX_REPLACED_SHARE of the
# bytes not valid UTF-8 (and at least _MIN_REPLACED of them).
_NUL_WINDOW = 8192
_MAX_REPLACED_SHARE = 0.01
_MIN_REPLACED = 8


@dataclasses.dataclass
class SourceStats:
    """What reading the sources found, for the data statistics."""

    files: int = 0  # files read (0 for the embedded corpus)
    replaced_bytes: int = 0  # bytes that were not valid UTF-8, each sequence decoded as U+FFFD

    def as_dict(self) -> dict:
        return {"source_files": self.files, "replaced_bytes": self.replaced_bytes}


class _Enough(Exception):
    """Internal: max_documents reached; stop reading further files."""


# --------------------------------------------------------------------------------------------------
# Files, folders, globs


def load_documents(data_cfg) -> list[str]:
    """The documents of :func:`read_documents`, without the statistics."""
    return read_documents(data_cfg)[0]


def read_documents(data_cfg) -> tuple[list[str], SourceStats]:
    """Loads the documents named by ``data_cfg`` (``config.data``): see the module docstring.

    Returns the documents and what reading them found (files read, bytes replaced).

    Raises:
        UserError: a path that does not exist or a glob that matches nothing, data that is all empty,
            a JSONL line that is not JSON or lacks the text field, a Parquet file without the column,
            an unknown format, a file that looks binary.
    """
    source = str(getattr(data_cfg, "source", "embedded") or "").strip()
    fmt = str(getattr(data_cfg, "format", "auto") or "auto").strip().lower()
    field = str(getattr(data_cfg, "text_field", "text") or "text")
    max_docs = int(getattr(data_cfg, "max_documents", 0) or 0)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not source:
        raise UserError("config.data.source is empty; give 'embedded' or a file, folder or glob")

    stats = SourceStats()
    if source == "embedded":
        docs = embedded_corpus()
        return (docs[:max_docs] if max_docs > 0 else docs), stats

    docs: list[str] = []

    def add(doc: str) -> None:
        if doc.strip():
            docs.append(doc)
            if 0 < max_docs <= len(docs):
                raise _Enough

    try:
        for path in resolve_paths(source, fmt):
            kind = fmt if fmt != "auto" else format_of(path)
            stats.files += 1
            if kind == "text":
                for doc in _read_text_file(path, stats):
                    add(doc)
            elif kind == "jsonl":
                for doc in _read_jsonl_file(path, field, stats):
                    add(doc)
            else:
                for doc in _read_parquet_file(path, field, stats):
                    add(doc)
    except _Enough:
        pass
    if not docs:
        raise UserError(f"data at {source} is empty (no non-blank documents)")
    return docs, stats


def format_of(path: str) -> str:
    low = path.lower()
    if low.endswith(_JSONL_EXT):
        return "jsonl"
    if low.endswith(_PARQUET_EXT):
        return "parquet"
    return "text"


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk_folder(folder: str, fmt: str) -> list[str]:
    exts = _EXTENSIONS[fmt]
    found = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop, or the same folder linked twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def resolve_paths(source: str, fmt: str) -> list[str]:
    """Expands the comma-separated ``source`` into an ordered, de-duplicated list of files."""
    paths: list[str] = []
    seen: set[str] = set()
    for entry in (e.strip() for e in source.split(",")):
        if not entry:
            continue
        expanded = os.path.expanduser(entry)
        if _has_magic(expanded):
            matches = sorted(_glob.glob(expanded, recursive=True))
            if not matches:
                raise UserError(f"no data found at {entry} (the glob matches nothing)")
        elif not os.path.exists(expanded):
            raise UserError(f"no data found at {entry} (no such file or folder)")
        else:
            matches = [expanded]
        files: list[str] = []
        for m in matches:
            if os.path.isdir(m):
                files.extend(_walk_folder(m, fmt))
            elif os.path.isfile(m):
                files.append(m)
        if not files:
            exts = ", ".join("*" + e for e in _EXTENSIONS[fmt])
            raise UserError(f"no data found at {entry} (no {exts} files)")
        for f in files:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                paths.append(f)
    if not paths:
        raise UserError(f"no data found at {source!r}")
    return paths


_counted = threading.local()


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    """Like ``errors='replace'`` (one U+FFFD per invalid sequence), counting the bytes replaced."""
    _counted.n += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("mixers_jax.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``(data.decode('utf-8', errors='replace'), number of bytes replaced)``."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _counted.n = 0
        text = data.decode("utf-8", errors="mixers_jax.count_replace")
        return text, _counted.n


def _decode(data: bytes, stats: SourceStats) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text, replaced = decode_utf8(data)
    stats.replaced_bytes += replaced
    return text


def refuse_binary(path: str, head: bytes, size: int, replaced: int) -> None:
    """UserError for a file that looks binary: see the module docstring."""
    nul = head.find(b"\0", 0, _NUL_WINDOW)
    if nul >= 0:
        raise UserError(f"{path} looks binary (a NUL byte at offset {nul}); data files must be UTF-8 text")
    if replaced >= _MIN_REPLACED and replaced > _MAX_REPLACED_SHARE * size:
        raise UserError(
            f"{path} looks binary or is not UTF-8 ({replaced} of {size} bytes are not valid UTF-8); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _read_text_file(path: str, stats: SourceStats) -> list[str]:
    data = read_bytes(path)
    refuse_binary(path, data[:_NUL_WINDOW], len(data), 0)
    before = stats.replaced_bytes
    text = _decode(data, stats)
    refuse_binary(path, b"", len(data), stats.replaced_bytes - before)
    return chunk_text(text)


def _text_of(obj, field: str, where: str) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise UserError(
            f"{where}: expected a JSON object with field {field!r}, got {type(obj).__name__}"
        )
    if field not in obj:
        keys = ", ".join(list(obj)[:10])
        raise UserError(f"{where}: no field {field!r} (fields: {keys}); set config.data.text_field")
    value = obj[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
    return value


def _read_jsonl_file(path: str, field: str, stats: SourceStats) -> Iterator[str]:
    """Texts of a JSONL file, read line by line; a file that starts with '[' is one JSON array."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    before = stats.replaced_bytes
    with f:
        head = f.read(1 << 16)
        refuse_binary(path, head[:_NUL_WINDOW], len(head), 0)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        if head.lstrip()[:1] == b"[":  # a .json file holding one array of objects (or strings)
            try:
                data = head + f.read()
                items = json.loads(_decode(data, stats))
                refuse_binary(path, b"", len(data), stats.replaced_bytes - before)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(items, list):
                raise UserError(f"{path}: expected a JSON array or JSON lines")
            for i, obj in enumerate(items):
                text = _text_of(obj, field, f"{path}: item {i}")
                if text:
                    yield text
            return
        f.seek(0)
        size = 0
        for lineno, raw in enumerate(f, start=1):
            size += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                line, replaced = decode_utf8(raw)
                stats.replaced_bytes += replaced
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            text = _text_of(obj, field, f"{path}:{lineno}")
            if text:
                yield text
        refuse_binary(path, b"", size, stats.replaced_bytes - before)


def open_parquet(path: str, columns: tuple[str, ...], setting: str):
    """A ``pyarrow.parquet.ParquetFile`` holding ``columns``; UserError (naming ``setting``, the
    config field that chooses the column) for an unreadable file or a missing column."""
    import pyarrow.parquet as pq  # imported lazily: only Parquet sources need it

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a long message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable Parquet file ({msg})") from None
    names = pf.schema_arrow.names
    for column in columns:
        if column not in names:
            raise UserError(
                f"{path}: no column {column!r} (columns: {', '.join(names[:20])}); set {setting}")
    return pf


def _read_parquet_file(path: str, field: str, stats: SourceStats) -> Iterator[str]:
    pf = open_parquet(path, (field,), "config.data.text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if isinstance(value, bytes):
                value = _decode(value, stats)
            if not isinstance(value, str):
                raise UserError(f"{path}: column {field!r} holds {type(value).__name__}, not text")
            yield value


# --------------------------------------------------------------------------------------------------
# Deterministic split

SPLITS = ("hash", "first")


def _doc_hash(doc: str) -> int:
    digest = hashlib.blake2b(doc.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Splits documents into (train, validation) by a stable hash of each document's text.

    A document goes to validation when ``blake2b(text) / 2**64 < val_fraction``. Identical texts hash
    alike, so the same text never lands on both sides. Order is preserved within each split.

    Small corpora: if ``val_fraction > 0`` and validation came out empty while there are at least two
    distinct texts, the text with the smallest hash (all its copies) moves to validation; symmetrically,
    if training came out empty, the text with the largest hash moves to training.
    """
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"config.data.val_fraction must be in [0, 1), got {val_fraction}")
    hashes = [_doc_hash(d) for d in docs]
    threshold = val_fraction * 2.0**64
    is_val = [h < threshold for h in hashes]
    if val_fraction > 0 and len(set(hashes)) >= 2:
        if not any(is_val):
            lo = min(hashes)
            is_val = [h == lo for h in hashes]
        elif all(is_val):
            hi = max(hashes)
            is_val = [h != hi for h in hashes]
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def split_first(docs: list[str], test_documents: int) -> tuple[list[str], list[str]]:
    """(train, test) = (docs[N:], docs[:N]): the first N documents of the source, in source order,
    are held out (the published convention: FineWeb's first 50k documents).

    Raises:
        UserError: N < 1, or N larger than the source.
    """
    n = int(test_documents)
    if n < 1:
        raise UserError(f"data.split='first' needs data.test_documents >= 1, got {n}")
    if n > len(docs):
        raise UserError(
            f"data.test_documents={n} is larger than the source ({len(docs)} documents)")
    return list(docs[n:]), list(docs[:n])


def split_for_config(docs: list[str], data_cfg) -> tuple[list[str], list[str]]:
    """(train, held out) as ``data.split`` says: 'hash' (default, :func:`split_documents` with
    ``data.val_fraction``) or 'first' (:func:`split_first` with ``data.test_documents``)."""
    split = str(_field(data_cfg, "split", "hash"))
    if split == "hash":
        return split_documents(docs, float(_field(data_cfg, "val_fraction", 0.05)))
    if split == "first":
        return split_first(docs, int(_field(data_cfg, "test_documents", 0)))
    raise UserError(f"unknown data.split {split!r}; choose one of: {', '.join(SPLITS)}")
