"""Loss functions. Each takes ``(apply_fn, params, batch)`` and returns ``(loss, metrics)``.

Objectives are built by name with :func:`build` from an :class:`ObjectiveContext` (the model and
train configs and the tokenizer's pad id), so that chunked or copy objectives can read the sizes
they need; ``OBJECTIVES`` maps each name to such a factory.

``apply_fn(params, tokens_BxN) -> logits_BxNxV``. Batches are dicts of ``tokens`` (int32),
``loss_mask`` (1.0 where a token may be a target; pads and EOS are 0,
docs/objectives.md#targets-and-ignored-positions) and
``token_bytes`` (UTF-8 bytes each token decodes to). ``metrics`` are *sums* (``nll``, ``tokens``,
``correct``, ``bytes``) so they aggregate exactly across micro-batches, devices and eval batches;
:mod:`mixers_jax.metrics` turns them into loss, accuracy and bits per byte.

Objectives (docs/objectives.md):

* ``clm``: for kinds 'memory' and 'rmt' (rows of s chunks of n tokens) the *chunked* CLM: output i of
  chunk c predicts t^(c)_{i+1} within the chunk (a chunk's first token is never a target and a chunk
  never predicts the next chunk's first token); L = (1/s)·Σ_c L_c with L_c the token-mean CE of
  chunk c over the batch; a chunk with no targets contributes 0 and the divisor stays s. A chunk
  whose loss is NaN is *not* skipped (the reference skipped it; here the trainer's non-finite stop
  reports it). Other kinds: the plain shifted CLM.
* ``copy``: input [t_{0:N/2}, t_{0:N/2}], labels [∅^{N/2}, t_{0:N/2}] (pads of the copied half stay ∅).
* ``blank_copy``: input [t_{0:N/2}, pad^{N/2}], the same labels; the copy must come from the memories.
* ``copy_full`` / ``blank_copy_full``: ``copy`` / ``blank_copy`` counted only on rows with no pad
  token (every chunk real text, the published copy evaluation); other rows contribute no targets.
* ``combined``: two passes per batch, (t, CLM labels) and the copy pass (``train.copy_pass`` 'blank'
  or 'copy'), L = L_clm + L_copy (per-chunk losses of both summed, divided by s once). With
  ``train.copy_delimiter`` D ≥ 0 the copy pass writes D at input positions N/2..N/2+2 and makes labels
  N/2−1..N/2+1 ∅ (the objective-switching model); ``copy`` and ``blank_copy`` use no delimiter.

The copy objectives read the loss with the chunked (within-chunk) shift for chunked kinds and the
plain shift for the others (the full-context baselines), on the same inputs and labels; N = the row
length must be even. Sums are plain token sums over every counted target; ``combined`` returns the
CLM pass under ``nll``/``tokens``/``correct``/``bytes`` and the copy pass under ``copy_nll``,
``copy_tokens``, ``copy_correct``, ``copy_bytes``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mixers_jax.config import CHUNKED_KINDS, field, input_length
from mixers_jax.errors import UserError


def token_nll(logits_BxNxV: jax.Array, targets_BxN: jax.Array) -> jax.Array:
    """Natural-log cross-entropy of each target, computed in float32."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]


def masked_sums(logits_BxNxV, targets_BxN, mask_BxN, bytes_BxN) -> dict[str, jax.Array]:
    """Summed NLL, counted targets, correct argmax predictions and target bytes."""
    mask_BxN = mask_BxN.astype(jnp.float32)
    nll_BxN = token_nll(logits_BxNxV, targets_BxN)
    correct_BxN = (jnp.argmax(logits_BxNxV, axis=-1) == targets_BxN).astype(jnp.float32)
    return {
        "nll": jnp.sum(nll_BxN * mask_BxN),
        "tokens": jnp.sum(mask_BxN),
        "correct": jnp.sum(correct_BxN * mask_BxN),
        "bytes": jnp.sum(bytes_BxN.astype(jnp.float32) * mask_BxN),
    }


def clm(apply_fn: Callable, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal LM: output i predicts token i+1 (docs/objectives.md#clm); the last output is never trained.

    The loss is the token mean over the batch's counted targets.
    """
    logits_BxNxV = apply_fn(params, batch["tokens"])
    sums = masked_sums(
        logits_BxNxV[:, :-1],
        batch["tokens"][:, 1:],
        batch["loss_mask"][:, 1:],
        batch["token_bytes"][:, 1:],
    )
    loss = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
    return loss, sums


def autoencode(apply_fn: Callable, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Autoencoder reconstruction: output i predicts token i itself, unshifted
    (docs/objectives.md#autoencode)."""
    logits_BxNxV = apply_fn(params, batch["tokens"])
    sums = masked_sums(logits_BxNxV, batch["tokens"], batch["loss_mask"], batch["token_bytes"])
    loss = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
    return loss, sums


def chunked_sums(
    logits_BxLxV, targets_BxL, mask_BxL, bytes_BxL, chunks: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Within-chunk shifted CE (docs/objectives.md#chunked-clm): (Σ_c L_c, token sums).

    Rows of length L = s·n are cut into s chunks; output i of chunk c predicts label c·n + i + 1 for
    i ≤ n−2. L_c is the token-mean CE of chunk c over the batch, 0 for a chunk without targets; the
    caller divides Σ_c L_c by s.
    """
    b, length, v = logits_BxLxV.shape
    s = int(chunks)
    n = length // s

    def chunked(x, *tail):
        return x.reshape(b, s, n, *tail)

    logits = chunked(logits_BxLxV, v)[:, :, :-1]
    targets = chunked(targets_BxL)[:, :, 1:]
    mask = chunked(mask_BxL).astype(jnp.float32)[:, :, 1:]
    nll_BxSxN = token_nll(logits, targets) * mask
    count_S = jnp.sum(mask, axis=(0, 2))
    loss_S = jnp.sum(nll_BxSxN, axis=(0, 2)) / jnp.maximum(count_S, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
    sums = {
        "nll": jnp.sum(nll_BxSxN),
        "tokens": jnp.sum(count_S),
        "correct": jnp.sum(correct),
        "bytes": jnp.sum(chunked(bytes_BxL)[:, :, 1:].astype(jnp.float32) * mask),
    }
    return jnp.sum(loss_S), sums


def shifted_sums(logits_BxNxV, targets_BxN, mask_BxN, bytes_BxN) -> dict[str, jax.Array]:
    """Plain shifted CE sums: output i predicts label i+1."""
    return masked_sums(logits_BxNxV[:, :-1], targets_BxN[:, 1:], mask_BxN[:, 1:], bytes_BxN[:, 1:])


COPY_MODES = ("copy", "blank")


def copy_batch(batch: dict, mode: str, pad_id: int, delimiter: int = -1) -> dict[str, jax.Array]:
    """The copy task (docs/objectives.md#copy) built from a batch of rows of even length N.

    Returns ``tokens`` (the input: [t_{0:N/2}, t_{0:N/2}] for ``mode='copy'``, [t_{0:N/2}, pad^{N/2}]
    for ``mode='blank'``), ``targets`` ([·, t_{0:N/2}]) and ``loss_mask`` / ``token_bytes`` that are 0
    on the first half and the first half's own values on the second (so pads stay ∅). ``delimiter``
    D ≥ 0 writes D at input positions N/2, N/2+1, N/2+2 and clears the mask at N/2−1, N/2, N/2+1.
    """
    if mode not in COPY_MODES:
        raise ValueError(f"copy mode must be one of {COPY_MODES}, got {mode!r}")
    tokens = batch["tokens"]
    length = tokens.shape[1]
    if length % 2:
        raise ValueError(f"copy objectives need an even row length, got {length}")
    h = length // 2
    first = tokens[:, :h]
    second = first if mode == "copy" else jnp.full_like(first, pad_id)
    mask_first = batch["loss_mask"][:, :h].astype(jnp.float32)
    bytes_first = batch["token_bytes"][:, :h]
    out = {
        "tokens": jnp.concatenate([first, second], axis=1),
        "targets": jnp.concatenate([first, first], axis=1),
        "loss_mask": jnp.concatenate([jnp.zeros_like(mask_first), mask_first], axis=1),
        "token_bytes": jnp.concatenate([jnp.zeros_like(bytes_first), bytes_first], axis=1),
    }
    if delimiter >= 0:
        out["tokens"] = out["tokens"].at[:, h : h + 3].set(jnp.asarray(delimiter, tokens.dtype))
        out["loss_mask"] = out["loss_mask"].at[:, h - 1 : h + 2].set(0.0)
        out["token_bytes"] = out["token_bytes"].at[:, h - 1 : h + 2].set(0)
    return out


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What an objective factory may read: ``config.model``, ``config.train`` and the pad id."""

    model: Any
    train: Any
    pad_id: int = 2


Objective = Callable[[Callable, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]

def _chunks(ctx: ObjectiveContext) -> int:
    """s for the chunked kinds ('memory', 'rmt'), 0 for every other kind."""
    return int(ctx.model.chunks) if ctx.model.kind in CHUNKED_KINDS else 0


def _loss_terms(logits, targets, mask, nbytes, chunks: int) -> tuple[jax.Array, jax.Array, dict]:
    """(numerator, divisor, sums): chunked -> (Σ_c L_c, s); plain -> (token-mean loss, 1)."""
    if chunks:
        total, sums = chunked_sums(logits, targets, mask, nbytes, chunks)
        return total, float(chunks), sums
    sums = shifted_sums(logits, targets, mask, nbytes)
    return sums["nll"] / jnp.maximum(sums["tokens"], 1.0), 1.0, sums


def _row_length(ctx: ObjectiveContext, name: str) -> int:
    length = input_length(ctx.model)
    if length % 2:
        raise UserError(
            f"objective {name!r} copies the first half of each row, so the row length must be even; "
            f"it is {length} (model.n_ctx x model.chunks for memory models)")
    return length


def _clm_factory(ctx: ObjectiveContext) -> Objective:
    chunks = _chunks(ctx)
    if not chunks:
        return clm

    def chunked_clm(apply_fn: Callable, params, batch):
        tokens = batch["tokens"]
        total, s, sums = _loss_terms(apply_fn(params, tokens), tokens, batch["loss_mask"],
                                     batch["token_bytes"], chunks)
        return total / s, sums

    return chunked_clm


def full_rows(tokens_BxN: jax.Array, pad_id: int) -> jax.Array:
    """bool [B]: True for a row with no pad token (every chunk is real text; pad = eos, so under
    concat packing a row holding a document boundary is not full either)."""
    return jnp.all(tokens_BxN != pad_id, axis=1)


def keep_full_rows(batch: dict, pad_id: int) -> dict:
    """``batch`` with ``loss_mask`` and ``token_bytes`` zeroed on every row that holds a pad, so
    only full rows count (docs/objectives.md#full-row-copy-evaluation)."""
    keep_Bx1 = full_rows(batch["tokens"], pad_id)[:, None]
    return dict(
        batch,
        loss_mask=jnp.where(keep_Bx1, batch["loss_mask"], jnp.zeros_like(batch["loss_mask"])),
        token_bytes=jnp.where(keep_Bx1, batch["token_bytes"], jnp.zeros_like(batch["token_bytes"])),
    )


def _copy_factory(mode: str, name: str, full_only: bool = False
                  ) -> Callable[[ObjectiveContext], Objective]:
    def factory(ctx: ObjectiveContext) -> Objective:
        _row_length(ctx, name)
        chunks, pad_id = _chunks(ctx), int(ctx.pad_id)

        def copy_loss(apply_fn: Callable, params, batch):
            if full_only:
                batch = keep_full_rows(batch, pad_id)
            cb = copy_batch(batch, mode, pad_id)
            total, s, sums = _loss_terms(apply_fn(params, cb["tokens"]), cb["targets"],
                                         cb["loss_mask"], cb["token_bytes"], chunks)
            return total / s, sums

        return copy_loss

    return factory


def _combined_factory(ctx: ObjectiveContext) -> Objective:
    length = _row_length(ctx, "combined")
    mode = str(ctx.train.copy_pass)
    if mode not in COPY_MODES:
        raise UserError(f"train.copy_pass must be one of {COPY_MODES}, got {mode!r}")
    delimiter = ctx.train.copy_delimiter
    vocab = int(ctx.model.vocab_size)
    if isinstance(delimiter, bool) or not isinstance(delimiter, int) or delimiter >= vocab:
        raise UserError(
            f"train.copy_delimiter must be a token id below model.vocab_size={vocab} (or -1: none), "
            f"got {delimiter!r}")
    if delimiter >= 0 and length < 6:
        raise UserError(f"train.copy_delimiter needs rows of at least 6 tokens, got {length}")
    chunks, pad_id = _chunks(ctx), int(ctx.pad_id)
    if bool(field(ctx.train, "combined_shared", False)) and ctx.model.kind == "memory":
        return _shared_combined(chunks, length // chunks, mode, pad_id, delimiter)

    def combined(apply_fn: Callable, params, batch):
        tokens = batch["tokens"]
        clm_total, s, clm_sums = _loss_terms(apply_fn(params, tokens), tokens, batch["loss_mask"],
                                             batch["token_bytes"], chunks)
        cb = copy_batch(batch, mode, pad_id, delimiter)
        copy_total, _, copy_sums = _loss_terms(apply_fn(params, cb["tokens"]), cb["targets"],
                                               cb["loss_mask"], cb["token_bytes"], chunks)
        sums = dict(clm_sums, **{f"copy_{k}": v for k, v in copy_sums.items()})
        return (clm_total + copy_total) / s, sums

    return combined


def _shared_combined(chunks: int, n: int, mode: str, pad_id: int, delimiter: int) -> Objective:
    """``combined`` for kind 'memory' with ``train.combined_shared``: the same loss and sums, with
    the work the two passes share done once. Chunk c predicts targets c·n+1..c·n+n−1, so the
    chunks before f = (N/2)//n hold no copy target and equal the clm pass's chunks (the copy
    pass changes positions ≥ N/2 only): the model reuses their memories and decodes the copy pass
    from chunk f on (``MemoryLM.__call__`` with ``copy_BxL``). Each skipped chunk's L_c is 0, so
    Σ_c L_c and the sums are unchanged; for the CPU presets (s = 4) this is 6 decoder chunks per
    row instead of 8 and 4 encoder chunks instead of 6. Equal to ``combined`` up to float
    rounding (tested)."""
    first = (chunks * n // 2) // n
    cut = first * n

    def combined(apply_fn: Callable, params, batch):
        tokens = batch["tokens"]
        cb = copy_batch(batch, mode, pad_id, delimiter)
        clm_logits, copy_logits = apply_fn(params, tokens, copy_BxL=cb["tokens"], copy_first=first)
        clm_total, s, clm_sums = _loss_terms(clm_logits, tokens, batch["loss_mask"],
                                             batch["token_bytes"], chunks)
        copy_total, _, copy_sums = _loss_terms(copy_logits, cb["targets"][:, cut:],
                                               cb["loss_mask"][:, cut:], cb["token_bytes"][:, cut:],
                                               chunks - first)
        sums = dict(clm_sums, **{f"copy_{k}": v for k, v in copy_sums.items()})
        return (clm_total + copy_total) / s, sums

    return combined


OBJECTIVES: dict[str, Callable[[ObjectiveContext], Objective]] = {
    "clm": _clm_factory,
    "autoencode": lambda ctx: autoencode,
    "copy": _copy_factory("copy", "copy"),
    "blank_copy": _copy_factory("blank", "blank_copy"),
    "copy_full": _copy_factory("copy", "copy_full", full_only=True),
    "blank_copy_full": _copy_factory("blank", "blank_copy_full", full_only=True),
    "combined": _combined_factory,
}


def build(name: str, ctx: ObjectiveContext) -> Objective:
    """The loss function called ``name`` for the model and settings in ``ctx``."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](ctx)
