"""A search index over a corpus file, built once with a trained model (docs/search.md).

An index is a folder:

* ``embeddings.npy``  float32 [N, d]: each passage's embedding divided by its L2 norm, so that a
  cosine similarity is a dot product; read back memory-mapped;
* ``spans.npy``       int64 [N, 2]: the passage's byte start and length in the corpus file
  (:mod:`mixers_jax.data.passages`), so the text is never copied;
* ``index.json``      the fingerprint: the model's (a hash of its parameters, tokenizer and model
  config, with its workdir and step), the corpus file's (path, size, sha256, format, text field,
  split) and what was built (passages, width, skipped passages, build time).

:func:`build` embeds the passages in batches into a temporary folder next to the index and renames
it into place at the end, so an index is whole or absent; an existing index with the same
fingerprint is left as it is, one whose model or corpus changed is rebuilt and replaced.
:func:`open_index` refuses (one ``UserError`` line) an index built by another model or whose corpus
file changed since; :meth:`Index.search` answers queries with the top-k passages and their cosine
scores.

The model is anything with the :class:`Embedder` interface: ``embed_texts(texts) -> float32
[N, d]`` and a ``fingerprint`` string; :func:`open_embedder` gives it for a trained run (its final
hidden state at the run's embedding position, :mod:`mixers_jax.retrieval.embed`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from mixers_jax.data import passages as passages_lib
from mixers_jax.errors import UserError
from mixers_jax.fileio import read_bytes, write_atomic
from mixers_jax.retrieval.embed import Embedder as RunEmbedder

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
SPANS_FILE = "spans.npy"
FORMAT_VERSION = 1
SCORE_ROWS = 1 << 16  # index rows scored at a time (bounds the score matrix of a query batch)


class Embedder(Protocol):
    """A frozen model that embeds texts: float32 [N, d], one row per text."""

    fingerprint: str  # identifies the parameters, tokenizer and model config
    description: dict  # workdir, step, ... (recorded in the index, shown in messages)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class WorkdirEmbedder:
    """:class:`Embedder` of a trained run: its model's embedding (the final hidden state at the
    run's embedding position and padding). The fingerprint covers the parameters, tokenizer and
    model config (``Run.fingerprint``) and the position and padding."""

    def __init__(self, embedder: RunEmbedder):
        run = embedder.run
        self.embedder, self.tokenizer = embedder, run.tokenizer
        how = f"position={embedder.position};padding={embedder.padding}".encode()
        self.fingerprint = hashlib.blake2b(run.fingerprint() + how, digest_size=16).hexdigest()
        self.description = {"workdir": run.workdir, "step": run.step,
                            "kind": str(run.config.model.kind), "n_ctx": embedder.n_ctx,
                            "position": embedder.position, "padding": embedder.padding}

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed(list(texts))


def open_embedder(workdir: str, batch_size: int = 64) -> WorkdirEmbedder:
    """The :class:`Embedder` of the newest intact checkpoint of ``workdir``."""
    return WorkdirEmbedder(RunEmbedder.from_workdir(workdir, batch_size=batch_size))


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Which corpus file an index covers and how its passages are cut."""

    path: str
    fmt: str = "auto"
    text_field: str = "text"
    split: str = "paragraph"

    def resolved(self) -> "CorpusSpec":
        path = os.path.abspath(self.path)
        if not os.path.isfile(path):
            raise UserError(f"corpus {self.path} is not a file")
        return CorpusSpec(path, passages_lib.format_of(path, self.fmt), self.text_field, self.split)

    def fields(self) -> dict:
        return {"path": self.path, "format": self.fmt, "text_field": self.text_field,
                "split": self.split}


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def read_fingerprint(folder: str) -> dict | None:
    """The ``index.json`` of ``folder``; None when it has none."""
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    try:
        meta = json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is damaged (not JSON); delete the index folder and rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a version-{FORMAT_VERSION} search index; rebuild it")
    return meta


def changes(meta: dict, embedder: Embedder, corpus: dict) -> list[str]:
    """What differs between an index's fingerprint and (model, corpus); [] when it is up to date."""
    out = []
    if meta["model"]["fingerprint"] != embedder.fingerprint:
        out.append(f"the model changed ({meta['model']['fingerprint'][:12]} -> "
                   f"{embedder.fingerprint[:12]})")
    old = meta["corpus"]
    if old["sha256"] != corpus["sha256"]:
        out.append(f"the corpus changed (sha256 {old['sha256'][:12]} -> {corpus['sha256'][:12]})")
    for key in ("path", "format", "text_field", "split"):
        if old[key] != corpus[key]:
            out.append(f"corpus {key} {old[key]!r} -> {corpus[key]!r}")
    return out


def _progress(done: int, total: int, t0: float) -> None:
    rate = done / max(time.time() - t0, 1e-9)
    print(f"indexed {done}/{total} passages ({rate:.1f} passages/s)", file=sys.stderr, flush=True)


def build(folder: str, embedder: Embedder, corpus: CorpusSpec, *, batch_size: int = 256,
          progress: Callable[[int, int, float], None] = _progress) -> dict:
    """Builds (or rebuilds) the index of ``corpus`` with ``embedder`` in ``folder``.

    Returns its fingerprint dict with ``action``: 'built', 'rebuilt' (with ``changes``) or
    'up_to_date' (nothing was done). A folder that exists but is not an index is refused. The new
    index is written into a temporary sibling folder and renamed into place, so an interrupted or
    failed build leaves the old index (or nothing) behind.
    """
    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    corpus = corpus.resolved()
    folder = os.path.abspath(folder)
    old = None
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise UserError(f"--index={folder} is a file, not an index folder")
        old = read_fingerprint(folder)
        if old is None and os.listdir(folder):
            raise UserError(f"{folder} exists and is not a search index (no {INDEX_FILE}); "
                            "give a new or empty folder")
    data = read_bytes(corpus.path)
    scan = passages_lib.scan(corpus.path, data, corpus.fmt, corpus.text_field, corpus.split)
    corpus_meta = dict(corpus.fields(), sha256=scan.sha256, size=scan.size)
    found = changes(old, embedder, corpus_meta) if old is not None else None
    if found == []:
        return dict(old, action="up_to_date")
    n = len(scan.spans)
    if n == 0:
        raise UserError(f"corpus {corpus.path} has no passages ({scan.non_utf8} skipped as "
                        f"non-UTF-8, {scan.empty} empty)")
    tmp = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        meta = _write_index(tmp, embedder, data, scan, corpus, corpus_meta, batch_size, progress)
        _replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if found:
        return dict(meta, action="rebuilt", changes=found)
    return dict(meta, action="built")


def _write_index(tmp, embedder, data, scan, corpus, corpus_meta, batch_size, progress) -> dict:
    n, t0 = len(scan.spans), time.time()
    out = None
    for start in range(0, n, batch_size):
        texts = [passages_lib.passage_text(data, int(s), int(length), corpus.fmt, corpus.text_field)
                 for s, length in scan.spans[start:start + batch_size]]
        emb = unit_rows(embedder.embed_texts(texts))
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"the embedder returned shape {emb.shape} for {len(texts)} texts")
        if out is None:
            out = np.lib.format.open_memmap(os.path.join(tmp, EMBEDDINGS_FILE), mode="w+",
                                            dtype=np.float32, shape=(n, emb.shape[1]))
        out[start:start + len(texts)] = emb
        progress(start + len(texts), n, t0)
    out.flush()
    dim = int(out.shape[1])
    del out
    np.save(os.path.join(tmp, SPANS_FILE), scan.spans)
    seconds = time.time() - t0
    meta = {
        "format_version": FORMAT_VERSION,
        "model": dict(embedder.description, fingerprint=embedder.fingerprint),
        "corpus": corpus_meta,
        "dim": dim,
        **scan.stats(),
        "build_seconds": round(seconds, 3),
        "passages_per_second": round(n / max(seconds, 1e-9), 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(os.path.join(tmp, INDEX_FILE), json.dumps(meta, indent=2, sort_keys=True))
    return meta


def _replace(tmp: str, folder: str) -> None:
    """Moves the finished ``tmp`` folder to ``folder`` (an old index there is removed after)."""
    if not os.path.exists(folder):
        os.replace(tmp, folder)
        return
    old = f"{tmp}.old"
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class Hit:
    rank: int
    score: float  # cosine similarity
    passage: int  # row of the index
    start: int  # byte offset of the passage in the corpus file
    text: str


class Index:
    """An opened index: the memory-mapped embeddings, the spans and the corpus bytes."""

    def __init__(self, folder: str, meta: dict, embeddings: np.ndarray, spans: np.ndarray,
                 corpus: np.ndarray):
        self.folder, self.meta = folder, meta
        self.embeddings, self.spans, self.corpus = embeddings, spans, corpus

    def text(self, i: int) -> str:
        start, length = (int(v) for v in self.spans[i])
        c = self.meta["corpus"]
        return passages_lib.passage_text(self.corpus, start, length, c["format"], c["text_field"])

    def top_k(self, queries_QxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], rows [Q, k']) best first, k' = min(k, N), cosine of unit rows."""
        q = unit_rows(queries_QxD)
        n = len(self.embeddings)
        k = min(int(k), n)
        best_s = np.zeros((len(q), 0), np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for start in range(0, n, SCORE_ROWS):
            block = np.asarray(self.embeddings[start:start + SCORE_ROWS])
            rows_QxR = np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))
            s = np.concatenate([best_s, q @ block.T], axis=1)
            i = np.concatenate([best_i, rows_QxR], axis=1)
            if s.shape[1] > k:
                keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
                s, i = np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)
            best_s, best_i = s, i
        order = np.lexsort((best_i, -best_s), axis=1)  # score descending, then row ascending
        return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)

    def search(self, embedder: Embedder, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """The top-``k`` passages of each query, best first."""
        if k < 1:
            raise UserError(f"--top_k must be positive, got {k}")
        scores, rows = self.top_k(embedder.embed_texts(list(queries)), k)
        return [[Hit(r + 1, float(s), int(i), int(self.spans[i][0]), self.text(int(i)))
                 for r, (s, i) in enumerate(zip(srow, irow))] for srow, irow in zip(scores, rows)]


def open_index(folder: str, embedder: Embedder | None = None) -> Index:
    """Opens ``folder``; UserError when it is not an index, was built by a model other than
    ``embedder`` (when given) or its corpus file is missing or changed since."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise UserError(f"index {folder} does not exist")
    meta = read_fingerprint(folder)
    if meta is None:
        raise UserError(f"{folder} is not a search index (no {INDEX_FILE})")
    if embedder is not None and meta["model"]["fingerprint"] != embedder.fingerprint:
        built_by = meta["model"].get("workdir", "?")
        raise UserError(
            f"index {folder} was built by another model ({built_by}, step "
            f"{meta['model'].get('step', '?')}, fingerprint {meta['model']['fingerprint'][:12]}); "
            f"this model's fingerprint is {embedder.fingerprint[:12]}: query with that model or "
            "rebuild the index")
    c = meta["corpus"]
    if not os.path.isfile(c["path"]):
        raise UserError(f"the corpus {c['path']} of index {folder} is missing")
    data = np.memmap(c["path"], dtype=np.uint8, mode="r") if os.path.getsize(c["path"]) else b""
    if len(data) != c["size"] or passages_lib.sha256_of(data) != c["sha256"]:
        raise UserError(f"the corpus {c['path']} changed since index {folder} was built; rebuild it "
                        "with the index command")
    try:
        embeddings = np.load(os.path.join(folder, EMBEDDINGS_FILE), mmap_mode="r")
        spans = np.load(os.path.join(folder, SPANS_FILE))
    except (OSError, ValueError) as e:
        raise UserError(f"index {folder} is damaged ({e}); rebuild it") from None
    if embeddings.shape != (meta["passages"], meta["dim"]) or spans.shape != (meta["passages"], 2):
        raise UserError(f"index {folder} is damaged (array shapes disagree with {INDEX_FILE}); "
                        "rebuild it")
    return Index(folder, meta, embeddings, spans, data)
