"""Cutting long texts into documents of about 4 KB at blank-line paragraph boundaries.

A plain-text file larger than ``SPLIT_LIMIT`` characters (and each module's text in the embedded
corpus) is cut into ~``SPLIT_TARGET``-character pieces, so that the hash split can hold out part of
a single-file corpus. Paragraphs longer than the limit are cut at line breaks, lines longer than it
at whitespace.
"""
from __future__ import annotations

import re

SPLIT_TARGET = 4096
SPLIT_LIMIT = 8192

_PARAGRAPH_BREAK = re.compile(r"(\n[ \t\r\f\v]*\n\s*)")


def _cut_long(text: str, limit: int, target: int) -> list[str]:
    """Cuts text longer than ``limit`` at line breaks, then at whitespace, then anywhere."""
    if len(text) <= limit:
        return [text]
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            cut = max(line.rfind(" ", target // 2, target), line.rfind("\t", target // 2, target))
            cut = cut + 1 if cut > 0 else target
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def chunk_text(text: str, target: int = SPLIT_TARGET, limit: int = SPLIT_LIMIT) -> list[str]:
    """Splits ``text`` longer than ``limit`` characters into ~``target``-character documents.

    Cuts fall on blank-line paragraph boundaries (the blank lines at a cut are dropped; those inside a
    piece are kept as they are). Text of at most ``limit`` characters is returned whole.
    """
    if len(text) <= limit:
        return [text]
    parts = _PARAGRAPH_BREAK.split(text)  # [para, sep, para, sep, ..., para]
    units: list[tuple[str, str]] = []  # (piece, separator that follows it)
    for i in range(0, len(parts), 2):
        sep = parts[i + 1] if i + 1 < len(parts) else ""
        pieces = _cut_long(parts[i], limit, target)
        for j, piece in enumerate(pieces):
            units.append((piece, sep if j == len(pieces) - 1 else ""))
    chunks: list[str] = []
    cur: list[tuple[str, str]] = []
    size = 0
    for piece, sep in units:
        if cur and (size >= target or size + len(piece) > limit):
            chunks.append("".join(p + s for p, s in cur[:-1]) + cur[-1][0])
            cur, size = [], 0
        cur.append((piece, sep))
        size += len(piece) + len(sep)
    if cur:
        chunks.append("".join(p + s for p, s in cur[:-1]) + cur[-1][0])
    return chunks
