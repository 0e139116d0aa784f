"""The embedded corpus: real English text that ships with Python itself, so no download is needed.

It is the standard library's own docstrings (module, class and function, via ``ast``; no module is
imported) plus the prose of ``pydoc_data/topics.py`` (the language reference shipped for
``help()``), grouped per module into ~4 KB documents. It is cached under ``$MIXERS_JAX_CACHE`` (or
``~/.cache/mixers_jax``); the cache is verified by a checksum and rebuilt when missing, stale or
corrupt, so results never depend on it.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterable, Iterator

from mixers_jax.data.chunking import SPLIT_TARGET, chunk_text
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic


_EMBEDDED_VERSION = 1  # bump when the extraction below changes: it invalidates old caches
_SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled",
    "lib-dynload",
}  # fmt: skip
_DOC_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_memo: dict[str, list[str]] = {}


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.endswith(".py") and not (rel == "pydoc_data" and name == "topics.py"):
                files.append(os.path.join(dirpath, name))
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order."""

    def visit(node: ast.AST) -> Iterator[str]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]  # cleandoc'ed
        if doc:
            yield doc
        for child in ast.iter_child_nodes(node):
            yield from _visit_children(child)

    def _visit_children(node: ast.AST) -> Iterator[str]:
        if isinstance(node, _DOC_NODES):
            yield from visit(node)
        else:
            for child in ast.iter_child_nodes(node):
                yield from _visit_children(child)

    yield from visit(tree)


def _topics_texts(root: str) -> list[str]:
    """The prose of pydoc_data/topics.py: the values of its ``topics`` dict literal."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    try:
        tree = ast.parse(_read_source(path), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    out.append(value.value)
    return out


def _read_source(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _group(texts: Iterable[str], target: int = SPLIT_TARGET) -> list[str]:
    """Joins texts with blank lines into documents of about ``target`` characters."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for text in texts:
        for piece in chunk_text(text, target, 2 * target):
            if cur and size + len(piece) > target:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(piece)
            size += len(piece) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def module_docstrings(seen: set[str] | None = None) -> Iterator[list[str]]:
    """Per standard-library module (in path order), its docstrings not yet in ``seen`` (which is
    updated), so repeats such as "Return self." appear once."""
    root = _stdlib_dir()
    seen = set() if seen is None else seen
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(_read_source(path), filename=path)
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            continue  # e.g. lib2to3 test data written in Python 2
        texts = []
        for doc in _docstrings(tree):
            if doc.strip() and doc not in seen:
                seen.add(doc)
                texts.append(doc)
        yield texts


def topic_texts() -> list[str]:
    """The pydoc topics (the language reference shipped for ``help()``), one text per topic."""
    return _topics_texts(_stdlib_dir())


def build_embedded_corpus() -> list[str]:
    """Builds the embedded corpus from the standard library's sources (no cache)."""
    root = _stdlib_dir()
    seen: set[str] = set()
    docs: list[str] = []
    for texts in module_docstrings(seen):
        docs.extend(_group(texts))
    for text in _topics_texts(root):
        text = text.strip("\n")
        if text.strip() and text not in seen:
            seen.add(text)
            docs.extend(_group([text]))
    return [d for d in docs if d.strip()]


def _cache_path() -> str:
    base = os.environ.get("MIXERS_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mixers_jax"
    )
    ver = ".".join(str(v) for v in sys.version_info[:3])
    key = hashlib.blake2b(
        f"{_EMBEDDED_VERSION}|{sys.version}|{_stdlib_dir()}".encode(), digest_size=4
    ).hexdigest()
    return os.path.join(base, f"embedded_corpus-{ver}-{key}.txt")


def _read_cache(path: str) -> list[str] | None:
    """Reads a cache file; None if it is missing or fails its checksum."""
    try:
        with open(path, "rb") as f:
            header, _, body = f.read().partition(b"\n")
        meta = json.loads(header)
        if (
            meta.get("version") != _EMBEDDED_VERSION
            or hashlib.blake2b(body).hexdigest() != meta.get("blake2b")
        ):
            return None
        docs = [json.loads(line) for line in body.decode("utf-8").splitlines()]
        return docs if len(docs) == meta.get("documents") else None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None


def _write_cache(path: str, docs: list[str]) -> None:
    """Writes the cache atomically (temp file + os.replace); failures only lose the cache."""
    body = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    header = json.dumps(
        {
            "version": _EMBEDDED_VERSION,
            "documents": len(docs),
            "blake2b": hashlib.blake2b(body).hexdigest(),
        }
    ).encode()
    try:
        write_atomic(path, header + b"\n" + body)
    except OSError:
        pass


def embedded_corpus() -> list[str]:
    """The embedded corpus (about 2 MB of English prose from the standard library), cached.

    Returns a new list each call. See the module docstring for what it contains.
    """
    path = _cache_path()
    docs = _memo.get(path)
    if docs is None:
        docs = _read_cache(path)
        if docs is None:
            docs = build_embedded_corpus()
            _write_cache(path, docs)
        _memo[path] = docs
    if not docs:
        raise UserError(f"the embedded corpus is empty: no docstrings found under {_stdlib_dir()}")
    return list(docs)
