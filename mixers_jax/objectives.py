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
* ``infonce``: (query, passage) batches; InfoNCE over in-batch candidates with the cosine of the
  embeddings at the configured position (:func:`info_nce`, docs/retrieval.md#infonce).
* ``combined``: two passes per batch, (t, CLM labels) and the copy pass (``train.copy_pass`` 'blank'
  or 'copy'), L = L_clm + L_copy (per-chunk losses of both summed, divided by s once). With
  ``train.copy_delimiter`` D ≥ 0 the copy pass writes D at input positions N/2..N/2+2 and makes labels
  N/2−1..N/2+1 ∅ (the objective-switching model); ``copy`` and ``blank_copy`` use no delimiter.
* ``match`` (kind 'matcher'): batches of ``embeddings`` [B, K+1, d] (a query, then K candidates),
  ``target`` [B] (the positive's candidate index) and ``weight`` [B]; CE of the target among the
  matcher's K scores; ``tokens`` counts queries, ``correct`` top-1 hits. ``match_cosine``: the same
  pools scored by cosine similarity / ``retrieval.temperature`` alone (a baseline; no parameters).
* ``entropy_weighted_clm`` (embedding_clm): the shifted CLM with per-target weights w_i = 1 − ê_i,
  ê the min–max normalized occlusion attribution of the model's memory (mixers_jax/attribution.py,
  docs/analysis.md#entropy-weighted-clm); the sums stay those of ``clm``.

* ``mtp`` (kinds 'mixer', 'transformer'): multi-token prediction, two passes (:func:`mtp_logits`):
  pass 1 on the tokens at shift 1, pass 2 on the argmax of pass 1 at shift 2, L = L_1 + L_2; the
  plain sums are pass 1's, pass 2's are under ``mtp2_nll`` etc.

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

from mixers_jax import attribution
from mixers_jax.config import CHUNKED_KINDS, field, input_length
from mixers_jax.errors import UserError
from mixers_jax.models.embedding import (check_embedding_model, cosine_matrix, embed_rows,
                                         embedding_position)


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
    """What an objective factory may read: ``config.model``, ``config.train``, the pad id, and for
    pair objectives ``config.retrieval`` and ``data.padding``."""

    model: Any
    train: Any
    pad_id: int = 2
    retrieval: Any = None
    padding: str = "right"


Objective = Callable[[Callable, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]


def context(config, train: Any = None, pad_id: int = 2) -> ObjectiveContext:
    """The :class:`ObjectiveContext` of a full config (``train``: a stage's train settings
    instead of ``config.train``)."""
    data = field(config, "data", None)
    return ObjectiveContext(model=config.model, train=config.train if train is None else train,
                            pad_id=int(pad_id), retrieval=field(config, "retrieval", None),
                            padding=str(field(data, "padding", "right") or "right"))

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


def mtp_logits(apply_fn: Callable, params, tokens_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two passes of multi-token prediction (docs/objectives.md#mtp): pass 1 reads the tokens
    (output i predicts t_{i+1}); pass 2 reads the argmax of pass 1, ĝ_i = argmax_v logits1[i, v]
    (a guess of t_{i+1} made from t_{≤i}; no gradient), and its output i predicts t_{i+2}. Both
    outputs at i depend on t_{≤i} only, so neither target is seen."""
    logits1_BxNxV = apply_fn(params, tokens_BxN)
    guess_BxN = jax.lax.stop_gradient(jnp.argmax(logits1_BxNxV, axis=-1)).astype(tokens_BxN.dtype)
    return logits1_BxNxV, apply_fn(params, guess_BxN)


def _mtp_factory(ctx: ObjectiveContext) -> Objective:
    if _chunks(ctx) or ctx.model.kind not in ("mixer", "transformer"):
        raise UserError(f"objective 'mtp' is for causal LMs (model.kind 'mixer' or 'transformer'), "
                        f"not {ctx.model.kind!r}")

    def mtp(apply_fn: Callable, params, batch):
        """L = L_1 + L_2: the token-mean CE of pass 1 at shift 1 and of pass 2 at shift 2; the sums
        of pass 1 are the plain ones (the next-token figures), pass 2's are under ``mtp2_``."""
        tokens, mask, nbytes = batch["tokens"], batch["loss_mask"], batch["token_bytes"]
        logits1, logits2 = mtp_logits(apply_fn, params, tokens)
        sums1 = shifted_sums(logits1, tokens, mask, nbytes)
        sums2 = masked_sums(logits2[:, :-2], tokens[:, 2:], mask[:, 2:], nbytes[:, 2:])
        loss = (sums1["nll"] / jnp.maximum(sums1["tokens"], 1.0)
                + sums2["nll"] / jnp.maximum(sums2["tokens"], 1.0))
        return loss, dict(sums1, **{f"mtp2_{k}": v for k, v in sums2.items()})

    return mtp


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


def info_nce(sim_QxC: jax.Array, positive_Q: jax.Array, temperature: float
             ) -> tuple[jax.Array, jax.Array]:
    """Per-query InfoNCE loss and top-1 hit (docs/retrieval.md#infonce):
    L_q = −log[exp(s_q,pos/τ) / Σ_c exp(s_q,c/τ)], hit_q = (argmax_c s_q,c == pos_q), float32 [Q]."""
    logits_QxC = sim_QxC.astype(jnp.float32) / jnp.float32(temperature)
    positive_Qx1 = positive_Q[:, None].astype(jnp.int32)
    loss_Q = (jax.nn.logsumexp(logits_QxC, axis=1)
              - jnp.take_along_axis(logits_QxC, positive_Qx1, axis=1)[:, 0])
    hit_Q = (jnp.argmax(logits_QxC, axis=1) == positive_Q).astype(jnp.float32)
    return loss_Q, hit_Q


def _infonce_factory(ctx: ObjectiveContext) -> Objective:
    """InfoNCE over in-batch candidates: query i's positive is passage i, the other B−1 passages
    of its (micro-)batch are its negatives; similarity = cosine of the embeddings at the configured
    position. Sums: ``nll`` (Σ L_q), ``tokens`` (queries), ``correct`` (top-1 hits among the batch's
    candidates), ``bytes`` 0."""
    check_embedding_model(ctx.model)
    retrieval = ctx.retrieval
    if retrieval is None:
        raise UserError("objective 'infonce' needs the retrieval settings (config.retrieval)")
    temperature = float(field(retrieval, "temperature", 0.02))
    if not temperature > 0:
        raise UserError(f"retrieval.temperature must be positive, got {temperature}")
    candidates = int(field(retrieval, "candidates", 32))
    per_step = int(ctx.train.batch_size) // max(int(ctx.train.grad_accum), 1)
    if candidates < 2 or candidates != per_step:
        raise UserError(
            f"retrieval.candidates={candidates} must be at least 2 and equal the pairs per "
            f"(micro-)batch, train.batch_size / train.grad_accum = {per_step}: the negatives of a "
            "query are the other passages of its batch")
    position = embedding_position({"model": ctx.model, "retrieval": retrieval})
    padding = str(ctx.padding)

    def infonce(apply_fn: Callable, params, batch):
        b = batch["query"].shape[0]
        tokens = jnp.concatenate([batch["query"], batch["passage"]], axis=0)
        lengths = jnp.concatenate([batch["query_length"], batch["passage_length"]], axis=0)
        emb = embed_rows(apply_fn, params, tokens, lengths, position, padding)
        loss_Q, hit_Q = info_nce(cosine_matrix(emb[:b], emb[b:]), jnp.arange(b), temperature)
        sums = {"nll": jnp.sum(loss_Q), "tokens": jnp.float32(b), "correct": jnp.sum(hit_Q),
                "bytes": jnp.float32(0.0)}
        return jnp.mean(loss_Q), sums

    return infonce


PAIR_OBJECTIVES = ("infonce",)  # objectives that read (query, passage) batches, not text rows


def pool_sums(scores_BxK: jax.Array, target_B: jax.Array, weight_B: jax.Array,
              temperature: float = 1.0) -> dict[str, jax.Array]:
    """Sums of choosing the positive t_b among K candidates by their scores s / τ
    (:func:`info_nce`): ``nll`` = Σ_b w_b L_b, ``tokens`` = Σ_b w_b (queries), ``correct`` =
    Σ_b w_b [argmax_k s_bk = t_b] (top-1), ``bytes`` = 0 (no text is predicted). w is 0 on filler
    rows of a short last evaluation batch."""
    loss_B, hit_B = info_nce(scores_BxK, target_B, temperature)
    weight_B = weight_B.astype(jnp.float32)
    return {"nll": jnp.sum(loss_B * weight_B), "tokens": jnp.sum(weight_B),
            "correct": jnp.sum(hit_B * weight_B), "bytes": jnp.zeros((), jnp.float32)}


def match(apply_fn: Callable, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct embedding matching (docs/search.md#direct-embedding-matching): the matcher scores
    the K candidates of ``embeddings`` [B, K+1, d] (the query first); the loss is the mean over
    queries of the cross-entropy of the positive's position ``target`` [B] among the K scores."""
    sums = pool_sums(apply_fn(params, batch["embeddings"]), batch["target"], batch["weight"])
    return sums["nll"] / jnp.maximum(sums["tokens"], 1.0), sums


def match_cosine(apply_fn: Callable, params, batch, temperature: float = 0.02
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The matcher's baseline on the same pools: no model, the candidates scored by their cosine
    similarity to the query over τ (``retrieval.temperature``; top-1 does not depend on τ, the CE
    does)."""
    del apply_fn, params
    e = batch["embeddings"].astype(jnp.float32)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    cos_BxK = jnp.einsum("bd,bkd->bk", e[:, 0], e[:, 1:])
    sums = pool_sums(cos_BxK, batch["target"], batch["weight"], temperature)
    return sums["nll"] / jnp.maximum(sums["tokens"], 1.0), sums


def _match_factory(name: str) -> Callable[[ObjectiveContext], Objective]:
    def factory(ctx: ObjectiveContext) -> Objective:
        if ctx.model.kind != "matcher":
            raise UserError(f"objective {name!r} needs model.kind='matcher', got {ctx.model.kind!r}")
        if name == "match":
            return match
        temperature = float(field(ctx.retrieval, "temperature", 0.02) or 0.02)
        return lambda apply_fn, params, batch: match_cosine(apply_fn, params, batch, temperature)

    return factory


def _entropy_weighted_factory(ctx: ObjectiveContext) -> Objective:
    """``entropy_weighted_clm`` for embedding_clm models (docs/analysis.md#entropy-weighted-clm)."""
    if ctx.model.kind != "embedding_clm":
        raise UserError(
            "objective 'entropy_weighted_clm' weights tokens by the attribution of the model's own "
            f"memory and needs model.kind='embedding_clm', got {ctx.model.kind!r}")

    def entropy_weighted_clm(apply_fn: Callable, params, batch):
        """Shifted CE with per-target weights w = 1 − ê (ê: normalized occlusion attribution of the
        memory, computed without gradient): L = Σ_i w_i·m_i·CE_i / Σ_i m_i over the batch's
        counted targets m. The sums are the unweighted CLM sums, so loss and bits per byte
        evaluate like ``clm``."""
        access = attribution.memory_access(ctx.model, apply_fn)
        tokens = batch["tokens"]
        m = access.memory(params, tokens)
        logits = access.decode(params, tokens, m)
        logits_occ = access.decode(params, tokens, access.occlude(m, 0))
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        weights = attribution.entropy_weights(logits[:, :-1], logits_occ[:, :-1], mask)
        nll = token_nll(logits[:, :-1], tokens[:, 1:])
        loss = jnp.sum(weights * nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        sums = shifted_sums(logits, tokens, batch["loss_mask"], batch["token_bytes"])
        return loss, dict(sums, weight=jnp.sum(weights * mask))

    return entropy_weighted_clm


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
    "match": _match_factory("match"),
    "match_cosine": _match_factory("match_cosine"),
    "infonce": _infonce_factory,
    "entropy_weighted_clm": _entropy_weighted_factory,
    "mtp": _mtp_factory,
}


def build(name: str, ctx: ObjectiveContext) -> Objective:
    """The loss function called ``name`` for the model and settings in ``ctx``."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](ctx)
