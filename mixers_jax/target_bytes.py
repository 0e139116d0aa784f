"""The exact bytes an objective counts as targets, for bits per byte and compressor baselines.

Bits per byte divide a summed NLL by the UTF-8 bytes of the counted target tokens; the classical
compressors (gzip, bz2, xz) are run on exactly those bytes. Which positions an objective counts is
read off the objective itself: the gradient of its summed target bytes with respect to the
per-token byte counts (``target_weights_fn``), so pads, the untrained first position of a causal
row and the copied halves of the copy objectives are handled for any objective.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax import objectives


class PieceBytes:
    """Token id -> the UTF-8 bytes it contributes to decoded text, with a vectorised join.

    ``<0xNN>`` pieces give that byte, control pieces nothing, others the piece with ``▁`` read as a
    space, so the lengths equal ``tokenizer.token_bytes()`` and the pieces of ``encode(s)`` join to
    exactly ``s.encode('utf-8')`` (also where a multi-byte character is split over byte pieces).
    """

    def __init__(self, pieces: Sequence[bytes]):
        self.pieces = list(pieces)
        self.lengths = np.array([len(p) for p in self.pieces], np.int64)
        self.offsets = np.cumsum(self.lengths) - self.lengths
        self.flat = np.frombuffer(b"".join(self.pieces), np.uint8)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PieceBytes:
        return cls(tokenizer.piece_bytes())

    def join(self, ids) -> bytes:
        """The bytes of the token ids ``ids`` (any shape, flattened in C order), concatenated."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        lens = self.lengths[ids]
        total = int(lens.sum())
        if not total:
            return b""
        # output byte p of token k reads flat[offsets[k] + p - (start of token k in the output)]
        shift = np.repeat(self.offsets[ids] - (np.cumsum(lens) - lens), lens)
        return self.flat[shift + np.arange(total)].tobytes()


def target_text(tokens: np.ndarray, weights: np.ndarray, table: PieceBytes) -> bytes:
    """The bytes of the counted target tokens of a batch: row by row, positions in order; a token
    counted k times appears in each of the row's first k layers (layer m: the tokens counted at least
    m times), so the length is Σ weights · token bytes."""
    counts = np.rint(np.asarray(weights)).astype(np.int64)
    k = int(counts.max(initial=0))
    if k <= 0:
        return b""
    layers = np.arange(1, k + 1)
    chosen = counts[:, None, :] >= layers[None, :, None]  # [B, K, L], C order = row, layer, position
    return table.join(np.broadcast_to(np.asarray(tokens)[:, None, :], chosen.shape)[chosen])


def exact_target_text(config, objective: str, pad_id: int, batches, table: PieceBytes,
                      counted_bytes: float) -> tuple[bytes, bool, int]:
    """(text, exact, sequences): the bytes of the targets ``objective`` counts in ``batches`` (for the
    compressor baselines), whether they provably are exactly those (their length equals the
    objective's byte count ``counted_bytes``), and the rows with at least one target. Falls back to
    the loss mask when the objective's targets cannot be traced."""
    texts, sequences, counted = [], 0, 0.0
    try:
        weights_of = target_weights_fn(config, objective, pad_id)
        for b in batches:
            w = np.asarray(weights_of(b))
            counted += float((w * b["token_bytes"]).sum())
            texts.append(target_text(b["tokens"], w, table))
            sequences += int((w.sum(axis=1) > 0).sum())
    except Exception:  # noqa: BLE001 - any failure here only selects the fallback below
        counted = float("nan")
    text = b"".join(texts)
    exact = (len(text) == round(counted) if math.isfinite(counted) else False) and (
        abs(counted - counted_bytes) <= max(0.5, 1e-6 * counted_bytes))
    if not exact:  # an objective whose target bytes the gradient cannot see: the loss mask
        text = b"".join(target_text(b["tokens"], b["loss_mask"], table) for b in batches)
        sequences = sum(int((b["loss_mask"].sum(axis=1) > 0).sum()) for b in batches)
    return text, exact, sequences


def target_weights_fn(config, objective: str, pad_id: int) -> Callable[[dict], Any]:
    """batch -> float32 [B, L]: how many times the objective counts each input token as a target.

    It is the gradient of the objective's summed target bytes with respect to the per-token bytes
    (the logits are irrelevant to it: a zero-logit stand-in model is used and compiled away).
    """
    ctx = objectives.ObjectiveContext(model=config.model, train=config.train, pad_id=int(pad_id))
    loss_fn = objectives.build(objective, ctx)
    vocab = int(config.model.vocab_size)

    def zeros(tokens):
        return jnp.zeros(tuple(tokens.shape) + (vocab,), jnp.float32)

    def zero_model(params, tokens, rngs=None, copy_BxL=None, copy_first=0):
        del params, rngs
        if copy_BxL is None:
            return zeros(tokens)
        return zeros(tokens), zeros(copy_BxL[:, int(copy_first) * int(config.model.n_ctx):])

    def weights(batch):
        def counted(token_bytes):
            return loss_fn(zero_model, None, dict(batch, token_bytes=token_bytes))[1]["bytes"]

        return jax.grad(counted)(batch["token_bytes"].astype(jnp.float32))

    return jax.jit(weights)
