"""Embedding texts with a trained mixer or transformer (docs/retrieval.md).

    embedder = Embedder.from_workdir("runs/mixer_cpu")
    vectors = embedder.embed(["a query", "a passage"])        # float32 [2, d]

Each text is tokenized with the run's tokenizer, truncated to its first n_ctx tokens, padded as
configured (``data.padding`` of the run unless given) and embedded by the final hidden state at the
embedding position (:func:`~mixers_jax.models.embedding.embedding_position`: ``retrieval.position``
of the run, or -2 for mixers and -1 for transformers), with pads left out of mixing and attention.
Batches have one fixed shape [batch_size, n_ctx] (the last one is filled up with empty rows whose
outputs are dropped), so the embedding function is compiled once.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.data.pipeline import pad_rows, tokenize_documents
from mixers_jax.models.embedding import (PADDINGS, check_embedding_model, embed_rows,
                                         embedding_position)
from mixers_jax.errors import UserError
from mixers_jax.workdir import Run, load_run

__all__ = ["Embedder", "embedding_position"]


class Embedder:
    """Embeds texts with a trained run's model.

    ``Embedder(run, padding=None, position=None, batch_size=64)``: ``run`` is a
    :class:`~mixers_jax.workdir.Run` (``workdir.load_run``); ``padding`` 'left' | 'right' (None:
    the run's ``data.padding``); ``position`` < 0 (None: :func:`embedding_position` of the run's
    config). Attributes: ``run``, ``padding``, ``position``, ``n_ctx``, ``dim``, ``batch_size``.
    """

    def __init__(self, run: Run, *, padding: str | None = None, position: int | None = None,
                 batch_size: int = 64):
        check_embedding_model(run.config.model)
        self.run = run
        self.padding = str(padding or run.config.data.get("padding", "right"))
        if self.padding not in PADDINGS:
            raise UserError(f"unknown padding {self.padding!r}; choose one of: {', '.join(PADDINGS)}")
        self.position = int(position) if position is not None else embedding_position(run.config)
        if self.position >= 0:
            raise UserError(f"the embedding position must be negative, got {self.position}")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.n_ctx = int(run.config.model.n_ctx)
        self.dim = int(run.config.model.d_model)
        model, position_, padding_ = run.model, self.position, self.padding

        def apply_fn(params, *args, **kw):
            return model.apply({"params": params}, *args, **kw)

        self._embed = jax.jit(lambda p, t, n: embed_rows(apply_fn, p, t, n, position_, padding_))

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, **kw) -> "Embedder":
        """The Embedder of the newest intact (or the given) checkpoint in ``workdir``."""
        return cls(load_run(workdir, step), **kw)

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (no BOS/EOS), int32 arrays."""
        return tokenize_documents(list(texts), self.run.tokenizer)

    def rows(self, token_docs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 [N, n_ctx] padded rows, int32 [N] lengths); UserError for an empty text."""
        empty = [i for i, d in enumerate(token_docs) if len(d) == 0]
        if empty:
            raise UserError(f"{len(empty)} empty text(s) cannot be embedded (first: #{empty[0]})")
        return pad_rows(token_docs, n_ctx=self.n_ctx, pad_id=self.run.tokenizer.pad_id,
                        padding=self.padding)

    def embed_tokens(self, token_docs: Sequence[np.ndarray], normalize: bool = False) -> np.ndarray:
        """float32 [N, dim] embeddings of tokenized texts (L2-normalized with ``normalize``)."""
        rows, lengths = self.rows(token_docs)
        out = np.zeros((len(rows), self.dim), np.float32)
        b = self.batch_size
        for start in range(0, len(rows), b):
            tok = rows[start:start + b]
            n = lengths[start:start + b]
            real = len(tok)
            if real < b:  # one compiled shape: fill up with one-token rows, dropped below
                tok = np.concatenate([tok, np.full((b - real, self.n_ctx), self.run.tokenizer.pad_id,
                                                   np.int32)])
                n = np.concatenate([n, np.ones((b - real,), np.int32)])
            emb = self._embed(self.run.params, jnp.asarray(tok), jnp.asarray(n))
            out[start:start + real] = np.asarray(emb)[:real]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)
        return out

    def embed(self, texts: Sequence[str], normalize: bool = False) -> np.ndarray:
        """float32 [N, dim] embeddings of ``texts`` (L2-normalized with ``normalize``)."""
        return self.embed_tokens(self.tokenize(texts), normalize=normalize)
