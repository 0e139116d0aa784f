"""Tokenize -> pack or pad -> per-host slice -> shuffle -> batch, with grain; checkpointable.

Batches are dicts of numpy arrays, each [B, n_ctx] with B the per-process batch:

* ``tokens``      int32   token ids;
* ``loss_mask``   float32 1.0 where the token may serve as a prediction target (real text), 0.0 on
  pad/EOS tokens (pad = eos, and every EOS target is ignored);
* ``token_bytes`` int32   UTF-8 bytes each token contributes to the text, 0 where loss_mask is 0.

The loss functions shift these themselves (``logits[:, :-1]`` against ``tokens[:, 1:]``), so exact bits
per byte = sum of target NLL in nats / (ln 2 * sum of ``token_bytes[:, 1:]`` over counted targets).

Packing:

* ``concat``: all documents streamed, each followed by one EOS, cut into consecutive non-overlapping
  n_ctx windows; the tail shorter than n_ctx is dropped. A window's first token is never a target.
* ``pad``: one document per row, truncated to its first n_ctx tokens (the rest of the document is
  dropped, not carried into another row), right-padded with pad_id (= eos: the tokenizer has a single
  id for both); ``data.padding='left'`` puts the pads before the text instead (the row's last token
  is then always its document's last kept token; pads are never targets either way). No EOS is added to a document (the first pad plays that role as an input, but is never
  a target). This is the published convention; there is no separate 'truncate' packing.

Split (``data.split``): 'hash' (default; ``data.val_fraction`` by a hash of each text) or 'first'
(the first ``data.test_documents`` documents of the source are held out, the rest train).

Multi-host: the rows (windows or documents) are cut to a multiple of ``process_count`` and process p
takes rows ``p, p + P, p + 2P, ...``, so every process has the same number of rows and of batches
(at most P - 1 rows are dropped). The training iterator shuffles a process's rows with ``seed``,
a different permutation every epoch (grain combines the seed with the epoch), repeats forever and
batches consecutively (a batch may straddle an epoch boundary). Its state is a small JSON-ready dict.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from mixers_jax.config import CHUNKED_KINDS, field, input_length
from mixers_jax.data.sources import read_documents, split_for_config
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.errors import UserError

PACKINGS = ("concat", "pad")
PADDINGS = ("right", "left")


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of each document (no BOS/EOS), as int32 arrays."""
    out: list[np.ndarray] = []
    for start in range(0, len(docs), 1024):  # chunks: Python int lists stay small
        chunk = tokenizer.encode_batch(docs[start : start + 1024])
        out.extend(np.asarray(ids, dtype=np.int32) for ids in chunk)
    return out


def _check_packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise UserError(f"unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")
    return packing


def count_windows(token_docs: Sequence[np.ndarray], *, n_ctx: int, packing: str) -> int:
    """Rows the documents give: n_ctx windows (concat) or documents (pad)."""
    _check_packing(packing)
    if packing == "pad":
        return len(token_docs)
    total = sum(len(d) for d in token_docs) + len(token_docs)  # one EOS after each document
    return total // int(n_ctx)


def check_padding(padding: str, packing: str = "pad") -> str:
    """``padding`` if it is 'right' or 'left'; 'left' only with one document per row."""
    if padding not in PADDINGS:
        raise UserError(f"unknown data.padding {padding!r}; choose one of: {', '.join(PADDINGS)}")
    if padding == "left" and packing != "pad":
        raise UserError("data.padding='left' needs one document per row (data.packing='pad')")
    return padding


def pad_rows(token_docs: Sequence[np.ndarray], *, n_ctx: int, pad_id: int,
             padding: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """(int32 [rows, n_ctx] rows, int32 [rows] lengths): one document per row, truncated to its
    first n_ctx tokens, padded with pad_id after the text ('right') or before it ('left')."""
    check_padding(padding)
    rows = np.full((len(token_docs), int(n_ctx)), pad_id, dtype=np.int32)
    lengths = np.zeros((len(token_docs),), dtype=np.int32)
    for i, doc in enumerate(token_docs):
        doc = doc[:n_ctx]
        lengths[i] = len(doc)
        if padding == "left":
            rows[i, n_ctx - len(doc):] = doc
        else:
            rows[i, : len(doc)] = doc
    return rows, lengths


def pack_rows(
    token_docs: Sequence[np.ndarray], *, n_ctx: int, packing: str, pad_id: int,
    padding: str = "right",
) -> np.ndarray:
    """int32 [rows, n_ctx]: concat windows or padded documents (see the module docstring)."""
    _check_packing(packing)
    n_ctx = int(n_ctx)
    if n_ctx < 2:
        raise UserError(f"n_ctx must be at least 2, got {n_ctx}")
    if packing == "pad":
        return pad_rows(token_docs, n_ctx=n_ctx, pad_id=pad_id, padding=padding)[0]
    check_padding(padding, packing)
    n_rows = count_windows(token_docs, n_ctx=n_ctx, packing=packing)
    if n_rows == 0:
        return np.zeros((0, n_ctx), dtype=np.int32)
    eos = np.asarray([pad_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for doc in token_docs:
        pieces.append(np.asarray(doc, dtype=np.int32))
        pieces.append(eos)
    stream = np.concatenate(pieces)
    return stream[: n_rows * n_ctx].reshape(n_rows, n_ctx)


def finish_batch(tokens: np.ndarray, *, pad_id: int, token_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """Adds ``loss_mask`` and ``token_bytes`` to a [B, n_ctx] token array."""
    tokens = np.asarray(tokens, dtype=np.int32)
    real = tokens != pad_id
    table = np.asarray(token_bytes, dtype=np.int32)
    return {
        "tokens": tokens,
        "loss_mask": real.astype(np.float32),
        "token_bytes": np.where(real, table[tokens], 0).astype(np.int32),
    }


def _host_rows(rows: np.ndarray, process_index: int, process_count: int) -> tuple[int, int]:
    """(rows per process, rows kept overall) after cutting to a multiple of process_count."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    per_host = len(rows) // process_count
    return per_host, per_host * process_count


def _too_small(
    split: str, token_docs, n_ctx: int, packing: str, rows: int, process_count: int, batch_size: int
) -> UserError:
    n_tokens = sum(len(d) for d in token_docs)
    unit = f"windows of n_ctx={n_ctx}" if packing == "concat" else "documents (packing=pad)"
    per = f" ({rows // process_count} per process over {process_count})" if process_count > 1 else ""
    more = "more data" if split == "train" else "a larger data.val_fraction or data.test_documents"
    smaller_ctx = "a smaller model.n_ctx, " if packing == "concat" else ""
    hint = f"use {more}, {smaller_ctx}or a smaller train.batch_size"
    return UserError(
        f"corpus too small: the {split} split's {n_tokens} tokens in {len(token_docs)} documents give "
        f"{rows} {unit}{per}, need at least {batch_size} (the per-process batch) per process; {hint}"
    )


def make_train_iterator(
    token_docs: Sequence[np.ndarray],
    *,
    n_ctx: int,
    batch_size: int,
    packing: str,
    seed: int,
    pad_id: int,
    token_bytes: np.ndarray,
    process_index: int = 0,
    process_count: int = 1,
    padding: str = "right",
) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator of per-process training batches.

    Raises:
        UserError: fewer rows per process than ``batch_size``.
    """
    rows = pack_rows(token_docs, n_ctx=n_ctx, packing=packing, pad_id=pad_id, padding=padding)
    per_host, kept = _host_rows(rows, process_index, process_count)
    if batch_size < 1 or per_host < batch_size:
        raise _too_small("train", token_docs, n_ctx, packing, len(rows), process_count, batch_size)
    table = np.asarray(token_bytes, dtype=np.int32)
    ds = (
        grain.MapDataset.source(rows)
        .slice(slice(process_index, kept, process_count))
        .shuffle(seed=int(seed) % 2**32)
        .repeat()
        .batch(int(batch_size), drop_remainder=True)
        .map(lambda t: finish_batch(t, pad_id=pad_id, token_bytes=table))
    )
    # The rows are in memory: read synchronously (no threads, no read-ahead), which also keeps
    # get_state exact; the trainer may add its own prefetch on top.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def get_iterator_state(it: grain.DatasetIterator) -> dict:
    """The iterator's position as a JSON-serialisable dict (round-tripped through json to be sure)."""
    return {"grain": json.loads(json.dumps(it.get_state()))}


def set_iterator_state(it: grain.DatasetIterator, state: dict) -> None:
    """Restores a position saved by :func:`get_iterator_state`."""
    if not isinstance(state, dict) or "grain" not in state:
        raise UserError("the data-iterator state in the checkpoint is malformed (no 'grain' entry)")
    it.set_state(state["grain"])


def make_eval_batches(
    token_docs: Sequence[np.ndarray],
    *,
    n_ctx: int,
    batch_size: int,
    packing: str,
    pad_id: int,
    token_bytes: np.ndarray,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "validation",
    padding: str = "right",
) -> list[dict[str, np.ndarray]]:
    """The first ``max_batches`` (0: all) full per-process batches, in order, no shuffle.

    Every process gets the same number of batches. Raises UserError if that number is zero.
    """
    rows = pack_rows(token_docs, n_ctx=n_ctx, packing=packing, pad_id=pad_id, padding=padding)
    per_host, kept = _host_rows(rows, process_index, process_count)
    n_batches = per_host // batch_size if batch_size >= 1 else 0
    if n_batches == 0:
        raise _too_small(split, token_docs, n_ctx, packing, len(rows), process_count, batch_size)
    if max_batches and max_batches > 0:
        n_batches = min(n_batches, int(max_batches))
    mine = rows[process_index:kept:process_count]
    return [
        finish_batch(mine[i * batch_size : (i + 1) * batch_size], pad_id=pad_id, token_bytes=token_bytes)
        for i in range(n_batches)
    ]


# --------------------------------------------------------------------------------------------------
# Everything the trainer needs, in one call


@dataclasses.dataclass
class DataBundle:
    tokenizer: Tokenizer
    train_iter: Any  # grain.DatasetIterator
    eval_batches: list  # list[dict[str, np.ndarray]]; empty when data.val_fraction == 0
    stats: dict
    tokenizer_path: str | None = None  # where the tokenizer was loaded from or saved to
    tokenizer_trained: bool = False  # True: trained by this call
    held_out: Any = None  # pair data (data/pairs.py): every held-out pair, for the pool evaluation


def check_chunked_rows(model_cfg, token_docs: Sequence[np.ndarray], packing: str) -> None:
    """Memory models with ``packing='pad'``: one document per row of s·n_ctx tokens.

    Raises UserError when even the longest document ends within the first s−1 chunks, so the last
    chunk of every row would be all pads (it would never be trained).
    """
    kind = field(model_cfg, "kind", "mixer")
    if packing != "pad" or kind not in CHUNKED_KINDS or not token_docs:
        return
    s, n = int(model_cfg.chunks), int(model_cfg.n_ctx)
    longest = max(len(d) for d in token_docs)
    if longest <= (s - 1) * n:
        raise UserError(
            f"data.packing='pad' with model.kind={kind!r}: the longest training document has {longest} "
            f"tokens but a row holds chunks x n_ctx = {s}x{n} = {s * n}, so the last chunk of every "
            "row would be all pads; use data.packing='concat', fewer model.chunks or a smaller "
            "model.n_ctx")


def resolve_tokenizer(data_cfg, vocab_size: int, tokenizer_path: str | None,
                      train_docs: Sequence[str], tokenizer: Tokenizer | None = None
                      ) -> tuple[Tokenizer, str | None, bool]:
    """(tokenizer, where it lives, trained now?): ``tokenizer`` if given; else
    ``data.tokenizer_model``; else an existing file at ``tokenizer_path``; else one trained on
    ``train_docs`` with ``vocab_size`` pieces (not written: the caller saves it after its checks).
    UserError for a missing configured file or a vocabulary size other than ``vocab_size``."""
    trained = False
    tok_path: str | None = None
    if tokenizer is None:
        configured = str(field(data_cfg, "tokenizer_model", "") or "")
        run_path = tokenizer_path
        if configured:
            if not os.path.isfile(configured):
                raise UserError(f"tokenizer model {configured} does not exist (data.tokenizer_model)")
            tok_path = configured
            tokenizer = Tokenizer.load(configured)
        elif run_path and os.path.isfile(run_path):
            tok_path = run_path
            tokenizer = Tokenizer.load(run_path)
        else:
            tokenizer = Tokenizer.train(
                train_docs,
                vocab_size,
                model_path=None,  # written below, after every check
                max_chars=int(field(data_cfg, "tokenizer_max_chars", 20_000_000)),
            )
            trained = True
            tok_path = run_path
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"tokenizer {tok_path or tokenizer.name} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size is {vocab_size}"
        )
    return tokenizer, tok_path, trained


def save_tokenizer_file(tokenizer: Tokenizer, path: str) -> None:
    """Writes a newly trained tokenizer to ``path`` (UserError naming the path on failure)."""
    try:
        tokenizer.save(path)
    except OSError as e:
        raise UserError(f"cannot write the tokenizer to {path}: {e.strerror or e}") from None
    tokenizer.name = path


def build_data(
    config,
    tokenizer_path: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    *,
    tokenizer: Tokenizer | None = None,
    save_tokenizer: bool = True,
) -> DataBundle:
    """Loads, splits and tokenizes the data; builds the training iterator and the eval batches.

    ``tokenizer_path`` (the run's ``workdir.TOKENIZER_FILE``; None: none) is where the run's tokenizer
    lives. Tokenizer, first that applies: ``tokenizer`` (e.g. restored from a checkpoint);
    ``config.data.tokenizer_model``; an existing file at ``tokenizer_path``; else a new one trained on
    the training split with ``config.model.vocab_size`` pieces. A new one is written (atomically) to
    ``tokenizer_path`` only after every check has passed and only if ``save_tokenizer``, so bad input
    leaves the workdir untouched. The per-process batch is ``train.batch_size // process_count``.

    Raises:
        UserError: missing or empty data, a split too small for one batch, a tokenizer whose vocabulary
            size differs from ``config.model.vocab_size``, a batch size not divisible by process_count.
    """
    data_cfg = config.data
    vocab_size = int(config.model.vocab_size)
    n_ctx = input_length(config.model)  # row length: chunks x n_ctx for memory models
    packing = _check_packing(str(field(data_cfg, "packing", "concat")))
    padding = check_padding(str(field(data_cfg, "padding", "right")), packing)
    global_batch = int(config.train.batch_size)
    if global_batch < 1 or global_batch % process_count:
        raise UserError(
            f"train.batch_size {global_batch} must be a positive multiple of the process count "
            f"{process_count}"
        )
    batch = global_batch // process_count
    val_fraction = float(field(data_cfg, "val_fraction", 0.05))

    docs, source_stats = read_documents(data_cfg)
    train_docs, val_docs = split_for_config(docs, data_cfg)
    split = str(field(data_cfg, "split", "hash"))
    source = field(data_cfg, "source", "embedded")
    if not train_docs:
        held = (f"test_documents={field(data_cfg, 'test_documents', 0)}" if split == "first"
                else f"val_fraction={val_fraction}")
        raise UserError(f"data at {source} leaves no training documents ({held})")
    if split == "hash" and val_fraction > 0 and not val_docs:
        raise UserError(
            f"data at {source} has a single distinct document; the validation split would be empty "
            "(use more documents or data.val_fraction=0)"
        )

    tokenizer, tok_path, trained = resolve_tokenizer(data_cfg, vocab_size, tokenizer_path,
                                                     train_docs, tokenizer)

    table = tokenizer.token_bytes()
    train_tok = tokenize_documents(train_docs, tokenizer)
    val_tok = tokenize_documents(val_docs, tokenizer)
    check_chunked_rows(config.model, train_tok, packing)
    common = dict(
        n_ctx=n_ctx,
        batch_size=batch,
        packing=packing,
        pad_id=tokenizer.pad_id,
        token_bytes=table,
        process_index=process_index,
        process_count=process_count,
        padding=padding,
    )
    train_iter = make_train_iterator(train_tok, seed=int(config.seed), **common)
    eval_batches = []
    if val_docs:
        eval_batches = make_eval_batches(
            val_tok, max_batches=int(config.train.eval_batches), split="validation", **common
        )

    if trained and save_tokenizer and tok_path:
        save_tokenizer_file(tokenizer, tok_path)

    stats = {
        "documents": len(docs),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": int(sum(len(d) for d in train_tok)),
        "val_tokens": int(sum(len(d) for d in val_tok)),
        "train_bytes": int(sum(len(d.encode("utf-8")) for d in train_docs)),
        "val_bytes": int(sum(len(d.encode("utf-8")) for d in val_docs)),
        "train_rows": count_windows(train_tok, n_ctx=n_ctx, packing=packing),
        "val_rows": count_windows(val_tok, n_ctx=n_ctx, packing=packing),
        "eval_batches": len(eval_batches),
        "per_process_batch": batch,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": "trained" if trained else (tok_path or "given"),
        **source_stats.as_dict(),  # source_files, replaced_bytes (invalid UTF-8, read as U+FFFD)
    }
    stats["train_bytes_per_token"] = stats["train_bytes"] / max(1, stats["train_tokens"])
    return DataBundle(tokenizer, train_iter, eval_batches, stats, tok_path, trained)
