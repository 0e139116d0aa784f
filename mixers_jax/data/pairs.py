"""(query, passage) pairs for retrieval (docs/retrieval.md#pair-data): reading, cleaning, splitting,
and the batches of the InfoNCE objective.

Sources (``retrieval.pairs``):

* ``builtin``: pairs from the embedded corpus, written by people, no download: each standard-library
  docstring whose first paragraph is one line (the summary, at least 10 characters) followed by at
  least 40 characters of text gives (summary, the rest of the docstring); each section of the pydoc
  topics gives (its heading, its text).
* paths (a file, folder or glob, or several separated by commas) of JSONL or Parquet files whose
  records hold the query and the passage in ``retrieval.query_field`` / ``passage_field``.

Cleaning, counted in the statistics: a pair whose query or passage is missing (null) or blank is
dropped (``empty_pairs``); a pair equal to an earlier one (``duplicate_pairs``) or whose passage
is an earlier pair's passage (``duplicate_passages``: a repeated passage would make the right
candidate ambiguous) is dropped; a JSONL line that is not valid UTF-8 is skipped
(``non_utf8_lines``). A record without one of the two fields, a line that is not JSON and a file
that looks binary are one-line errors.

Split: a pair is held out when the hash of its passage falls below ``retrieval.held_out_fraction``
(:func:`mixers_jax.data.sources.split_documents`), so the split is deterministic and a passage is
never on both sides.

Batches (:func:`make_pair_iterator`, :func:`pair_batches`) hold ``query`` / ``passage`` int32
[B, n_ctx] rows (one text per row, truncated to its first n_ctx tokens, padded as
``data.padding``) and their ``query_length`` / ``passage_length`` int32 [B].
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterator, Sequence

import grain
import numpy as np

from mixers_jax.config import field
from mixers_jax.data import embedded
from mixers_jax.data.pipeline import (DataBundle, check_padding, pad_rows, resolve_tokenizer,
                                      save_tokenizer_file, tokenize_documents)
from mixers_jax.data.sources import (decode_utf8, format_of, open_parquet, refuse_binary,
                                     resolve_paths, split_documents)
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.errors import UserError

MIN_SUMMARY_CHARS = 10
MIN_PASSAGE_CHARS = 40
POOL_SIZES = (32, 64, 128, 256, 512, 1024)  # the default pools (capped by the held-out set)
_SECTION = re.compile(r"\n([^\n]+)\n([=*\-])\2{3,}\n")


def pool_sizes(requested: Sequence[int], held_out: int) -> list[int]:
    """The pool sizes to score: ``requested`` (UserError for one below 2 or above ``held_out``),
    or, when empty, :data:`POOL_SIZES` up to ``held_out``."""
    sizes = [int(p) for p in requested]
    if not sizes:
        sizes = [p for p in POOL_SIZES if p <= held_out]
        if not sizes:
            raise UserError(f"only {held_out} held-out pairs: fewer than the smallest pool "
                            f"({POOL_SIZES[0]}); use more pairs or a larger held-out fraction")
        return sizes
    for p in sizes:
        if p < 2:
            raise UserError(f"a pool needs at least 2 candidates, got pool size {p}")
        if p > held_out:
            raise UserError(f"pool size {p} is larger than the held-out set ({held_out} pairs)")
    return sorted(set(sizes))


@dataclasses.dataclass
class PairSet:
    """Cleaned pairs (parallel lists) and what cleaning found."""

    queries: list[str]
    passages: list[str]
    stats: dict

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, keep: Sequence[bool]) -> "PairSet":
        return PairSet([q for q, k in zip(self.queries, keep) if k],
                       [p for p, k in zip(self.passages, keep) if k], {})


# --------------------------------------------------------------------------------------------------
# Sources


def docstring_pair(doc: str) -> tuple[str, str] | None:
    """(summary line, rest) of a docstring whose first paragraph is one line, else None."""
    head, sep, rest = doc.strip().partition("\n\n")
    head, rest = head.strip(), rest.strip()
    if not sep or "\n" in head or len(head) < MIN_SUMMARY_CHARS or len(rest) < MIN_PASSAGE_CHARS:
        return None
    return head, rest


def topic_pairs(text: str) -> list[tuple[str, str]]:
    """(heading, section text) for each underlined section of a pydoc topic."""
    parts = _SECTION.split("\n" + text.strip("\n") + "\n")
    out = []
    for i in range(1, len(parts) - 2, 3):
        heading, body = parts[i].strip(), parts[i + 2].strip()
        if len(heading) >= 3 and len(body) >= MIN_PASSAGE_CHARS:
            out.append((heading, body))
    return out


def builtin_pairs(max_pairs: int = 0) -> Iterator[tuple[str, str]]:
    """The built-in pairs (module docstring), in a deterministic order; stops after ``max_pairs``."""
    count = 0
    for texts in embedded.module_docstrings():
        for doc in texts:
            pair = docstring_pair(doc)
            if pair:
                yield pair
                count += 1
                if 0 < max_pairs <= count:
                    return
    for text in embedded.topic_texts():
        for pair in topic_pairs(text):
            yield pair
            count += 1
            if 0 < max_pairs <= count:
                return


def _value(obj, key: str, where: str) -> str | None:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with fields, got {type(obj).__name__}")
    if key not in obj:
        raise UserError(f"{where}: no field {key!r} (fields: {', '.join(list(obj)[:10])}); set "
                        "retrieval.query_field / retrieval.passage_field")
    value = obj[key]
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} is a {type(value).__name__}, not a string")
    return value


def _jsonl_pairs(path: str, fields: tuple[str, str], stats: dict) -> Iterator[tuple]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        head = f.read(1 << 16)
        refuse_binary(path, head, len(head), 0)
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            line, replaced = decode_utf8(raw)
            if replaced:
                stats["non_utf8_lines"] += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            where = f"{path}:{lineno}"
            yield tuple(_value(obj, k, where) for k in fields)


def _parquet_pairs(path: str, fields: tuple[str, str], stats: dict) -> Iterator[tuple]:
    pf = open_parquet(path, fields, "retrieval.query_field / retrieval.passage_field")
    for batch in pf.iter_batches(columns=list(fields), batch_size=4096):
        for values in zip(*(batch.column(i).to_pylist() for i in range(len(fields)))):
            out = []
            for key, v in zip(fields, values):
                if isinstance(v, bytes):
                    v, replaced = decode_utf8(v)
                    if replaced:
                        stats["non_utf8_lines"] += 1
                        break
                if v is not None and not isinstance(v, str):
                    raise UserError(f"{path}: column {key!r} holds {type(v).__name__}, not text")
                out.append(v)
            else:
                yield tuple(out)


def read_pairs(retrieval_cfg) -> PairSet:
    """The cleaned pairs of ``retrieval.pairs`` (module docstring); UserError when none is left."""
    source = str(field(retrieval_cfg, "pairs", "builtin") or "").strip()
    max_pairs = int(field(retrieval_cfg, "max_pairs", 0) or 0)
    fields = (str(field(retrieval_cfg, "query_field", "query")),
              str(field(retrieval_cfg, "passage_field", "passage")))
    stats = {"source": source, "pairs_read": 0, "empty_pairs": 0, "duplicate_pairs": 0,
             "duplicate_passages": 0, "non_utf8_lines": 0, "files": 0}
    if not source:
        raise UserError("retrieval.pairs is empty; give 'builtin' or JSONL / Parquet files")
    if source == "builtin":
        raw: Iterator[tuple] = builtin_pairs()
    else:
        raw = _file_pairs(source, fields, stats)
    queries, passages = [], []
    seen_pairs: set[tuple[str, str]] = set()
    seen_passages: set[str] = set()
    for query, passage in raw:
        stats["pairs_read"] += 1
        if not query or not query.strip() or not passage or not passage.strip():
            stats["empty_pairs"] += 1
            continue
        query, passage = query.strip(), passage.strip()
        if (query, passage) in seen_pairs:
            stats["duplicate_pairs"] += 1
            continue
        seen_pairs.add((query, passage))
        if passage in seen_passages:
            stats["duplicate_passages"] += 1
            continue
        seen_passages.add(passage)
        queries.append(query)
        passages.append(passage)
        if 0 < max_pairs <= len(queries):
            break
    stats["pairs"] = len(queries)
    if not queries:
        raise UserError(f"retrieval.pairs {source}: no usable pair ({stats['pairs_read']} read, "
                        f"{stats['empty_pairs']} empty, {stats['duplicate_pairs']} duplicate)")
    return PairSet(queries, passages, stats)


def _file_pairs(source: str, fields: tuple[str, str], stats: dict) -> Iterator[tuple]:
    for path in resolve_paths(source, "auto"):
        kind = format_of(path)
        if kind == "text":
            raise UserError(f"{path}: pair files must be JSONL (.jsonl, .json) or Parquet (.parquet)")
        stats["files"] += 1
        yield from (_jsonl_pairs if kind == "jsonl" else _parquet_pairs)(path, fields, stats)


def split_pairs(pairs: PairSet, held_out_fraction: float) -> tuple[PairSet, PairSet]:
    """(train, held out) by the hash of each passage (:func:`split_documents`)."""
    if not 0.0 < float(held_out_fraction) < 1.0:
        raise UserError(f"retrieval.held_out_fraction must be in (0, 1), got {held_out_fraction}")
    _, held = split_documents(pairs.passages, float(held_out_fraction))
    held_set = set(held)
    is_held = [p in held_set for p in pairs.passages]
    return pairs.subset([not h for h in is_held]), pairs.subset(is_held)


# --------------------------------------------------------------------------------------------------
# Rows and batches


@dataclasses.dataclass
class PairRows:
    """Tokenized, padded pairs: int32 [P, n] rows and [P] lengths for queries and passages."""

    query: np.ndarray
    query_length: np.ndarray
    passage: np.ndarray
    passage_length: np.ndarray
    queries: list[str]  # the texts (for lexical baselines on the same pairs)
    passages: list[str]

    def __len__(self) -> int:
        return len(self.query)

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {"query": self.query[index], "query_length": self.query_length[index],
                "passage": self.passage[index], "passage_length": self.passage_length[index]}


def pair_rows(pairs: PairSet, tokenizer: Tokenizer, n_ctx: int, padding: str) -> PairRows:
    """Tokenizes and pads both sides (pads = the tokenizer's pad id, as ``data.padding``)."""
    check_padding(padding)
    q, ql = pad_rows(tokenize_documents(pairs.queries, tokenizer), n_ctx=n_ctx,
                     pad_id=tokenizer.pad_id, padding=padding)
    p, pl = pad_rows(tokenize_documents(pairs.passages, tokenizer), n_ctx=n_ctx,
                     pad_id=tokenizer.pad_id, padding=padding)
    return PairRows(q, ql, p, pl, list(pairs.queries), list(pairs.passages))


def make_pair_iterator(rows: PairRows, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator of per-process pair batches (a new order every
    epoch); each process takes pairs p, p + P, ... of the training pairs."""
    kept = (len(rows) // process_count) * process_count
    ds = (
        grain.MapDataset.source(np.arange(len(rows)))
        .slice(slice(process_index, kept, process_count))
        .shuffle(seed=int(seed) % 2**32)
        .repeat()
        .batch(int(batch_size), drop_remainder=True)
        .map(lambda idx: rows.batch(np.asarray(idx)))
    )
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def pair_batches(rows: PairRows, batch_size: int, max_batches: int = 0, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first ``max_batches`` (0: all) full per-process batches of ``rows``, in order."""
    mine = np.arange(len(rows))[process_index:(len(rows) // process_count) * process_count:
                                process_count]
    n = len(mine) // batch_size
    if max_batches > 0:
        n = min(n, int(max_batches))
    return [rows.batch(mine[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def held_out_fraction(retrieval_cfg) -> float:
    """``retrieval.held_out_fraction``; 0 = automatic: 0.35 for the built-in pairs (about 1,100
    held out, enough for pools of 1024), 0.1 for pair files."""
    frac = float(field(retrieval_cfg, "held_out_fraction", 0.0) or 0.0)
    if frac:
        return frac
    return 0.35 if str(field(retrieval_cfg, "pairs", "builtin")).strip() == "builtin" else 0.1


def load_split_pairs(retrieval_cfg) -> tuple[PairSet, PairSet, dict]:
    """(train pairs, held-out pairs, statistics) of ``retrieval.pairs``."""
    pairs = read_pairs(retrieval_cfg)
    train, held = split_pairs(pairs, held_out_fraction(retrieval_cfg))
    stats = dict(pairs.stats, train_pairs=len(train), held_out_pairs=len(held))
    return train, held, stats


def build_pair_data(config, tokenizer_path: str | None = None, process_index: int = 0,
                    process_count: int = 1, *, tokenizer: Tokenizer | None = None,
                    save_tokenizer: bool = True) -> DataBundle:
    """The pair data of a run with a pair objective: a :class:`~mixers_jax.data.pipeline.DataBundle`
    whose iterator yields pair batches of ``train.batch_size // process_count`` pairs, whose
    evaluation batches are held-out pair batches and whose ``held_out`` holds every held-out pair
    (:class:`PairRows`) for the pool evaluation. The tokenizer is found as
    :func:`~mixers_jax.data.pipeline.resolve_tokenizer` says (a new one is trained on the training
    pairs' text and written only after every check).

    Raises:
        UserError: unreadable or unusable pairs, fewer training pairs than one batch of candidates,
            fewer held-out pairs than one batch, a pool size larger than the held-out set.
    """
    global_batch = int(config.train.batch_size)
    if global_batch < 1 or global_batch % process_count:
        raise UserError(f"train.batch_size {global_batch} must be a positive multiple of the "
                        f"process count {process_count}")
    batch = global_batch // process_count
    padding = check_padding(str(field(config.data, "padding", "right")))
    train, held, stats = load_split_pairs(config.retrieval)
    source = stats["source"]
    if len(train) // process_count < batch:
        raise UserError(f"retrieval.pairs {source}: {len(train)} training pairs, fewer than one "
                        f"batch of candidates (train.batch_size={global_batch}); use more pairs "
                        "or a smaller batch")
    if len(held) // process_count < batch:
        raise UserError(f"retrieval.pairs {source}: {len(held)} held-out pairs, fewer than one batch "
                        f"of candidates ({global_batch}); use more pairs or a larger "
                        "retrieval.held_out_fraction")
    sizes = pool_sizes(tuple(field(config.retrieval, "pool_sizes", ()) or ()), len(held))
    tokenizer, tok_path, trained = resolve_tokenizer(
        config.data, int(config.model.vocab_size), tokenizer_path,
        train.queries + train.passages, tokenizer)
    n_ctx = int(config.model.n_ctx)
    train_rows = pair_rows(train, tokenizer, n_ctx, padding)
    held_rows = pair_rows(held, tokenizer, n_ctx, padding)
    train_iter = make_pair_iterator(train_rows, batch, int(config.seed), process_index, process_count)
    eval_batches = pair_batches(held_rows, batch, int(config.train.eval_batches), process_index,
                                process_count)
    if trained and save_tokenizer and tok_path:
        save_tokenizer_file(tokenizer, tok_path)
    lengths = np.concatenate([train_rows.query_length, train_rows.passage_length])
    stats.update(pool_sizes=sizes, padding=padding, per_process_batch=batch,
                 eval_batches=len(eval_batches), vocab_size=tokenizer.vocab_size,
                 tokenizer="trained" if trained else (tok_path or "given"),
                 train_tokens=int(lengths.sum()),
                 truncated_texts=int(np.sum(lengths >= n_ctx)))
    return DataBundle(tokenizer, train_iter, eval_batches, stats, tok_path, trained,
                      held_out=held_rows)
