"""Sequence embeddings from a causal LM's final hidden states (docs/retrieval.md).

A row holds one text of ``length`` real tokens, padded to n with pads before the text
(``padding='left'``) or after it (``'right'``). The embedding is the final hidden state (what the LM
head reads) at the embedding position p < 0, counted from the row's last real token:

    index = n + max(p, -length)        (left padding: the same index in every row)
    index = max(length + p, 0)         (right padding: gathered per row)

so p = -1 is the last real token, p = -2 the one before it, and a row shorter than |p| uses its
first token. Pads are left out of the computation (``keep`` = 0 there): they are masked out of the
token mixing of mixers and out of the attention of transformers, whose positions count real tokens
only. The default position is -2 for mixers (a clm-trained flat mixer never trains the last row of
its mixing matrices: the last output has no target) and -1 for every other model.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mixers_jax.config import field
from mixers_jax.errors import UserError

Array = jax.Array

PADDINGS = ("right", "left")
EMBEDDING_KINDS = ("mixer", "transformer")  # models with a ``final_hidden`` method


def default_position(kind: str) -> int:
    """-2 for masked mixers, -1 for transformers."""
    return -2 if kind == "mixer" else -1


def embedding_position(config) -> int:
    """The configured embedding position (``retrieval.position``; 0 = the model kind's default),
    a negative offset from the row's last real token. ``config`` is a full config (ConfigDict or a
    loaded config.json dict)."""
    retrieval = field(config, "retrieval", None)
    position = int(field(retrieval, "position", 0) or 0) if retrieval is not None else 0
    if position > 0:
        raise UserError(f"retrieval.position must be negative (counted from the row's end) or 0 "
                        f"(the default), got {position}")
    return position or default_position(str(field(field(config, "model"), "kind")))


def check_embedding_model(model_cfg) -> None:
    """UserError unless ``model_cfg.kind`` is a plain causal LM with final hidden states."""
    kind = str(field(model_cfg, "kind"))
    if kind not in EMBEDDING_KINDS:
        raise UserError(f"embeddings come from a mixer or a transformer LM, not model.kind={kind!r}")


def keep_mask(lengths_B: Array, n: int, padding: str) -> Array:
    """float32 [B, n]: 1 on the real tokens of each row, 0 on its pads."""
    idx_1xN = jnp.arange(n)[None, :]
    lengths_Bx1 = jnp.asarray(lengths_B)[:, None]
    real = idx_1xN >= n - lengths_Bx1 if padding == "left" else idx_1xN < lengths_Bx1
    return real.astype(jnp.float32)


def embedding_index(lengths_B: Array, n: int, position: int, padding: str) -> Array:
    """int32 [B]: the index of the embedding token in each row (module docstring)."""
    if padding not in PADDINGS:
        raise UserError(f"unknown padding {padding!r}; choose one of: {', '.join(PADDINGS)}")
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    offset_B = jnp.maximum(jnp.int32(position), -lengths_B)
    if padding == "left":
        return (n + offset_B).astype(jnp.int32)
    return jnp.maximum(lengths_B + offset_B, 0).astype(jnp.int32)


def gather_rows(h_BxNxD: Array, index_B: Array) -> Array:
    """h[b, index[b], :] as float32 [B, D]."""
    picked = jnp.take_along_axis(h_BxNxD, index_B[:, None, None].astype(jnp.int32), axis=1)
    return picked[:, 0].astype(jnp.float32)


def embed_rows(apply_fn: Callable[..., Array], params: Any, tokens_BxN: Array, lengths_B: Array,
               position: int, padding: str) -> Array:
    """float32 [B, D] embeddings of padded rows. ``apply_fn(params, tokens, keep, method=...)`` is
    the model's apply (e.g. ``lambda p, *a, **k: model.apply({'params': p}, *a, **k)``)."""
    n = tokens_BxN.shape[1]
    keep_BxN = keep_mask(lengths_B, n, padding)
    h_BxNxD = apply_fn(params, tokens_BxN, keep_BxN, method="final_hidden")
    return gather_rows(h_BxNxD, embedding_index(lengths_B, n, position, padding))


def cosine_matrix(a_QxD: Array, b_CxD: Array, eps: float = 1e-8) -> Array:
    """float32 [Q, C] cosine similarities cos(a_q, b_c) = a_q·b_c / (|a_q| |b_c|)."""
    a = a_QxD.astype(jnp.float32)
    b = b_CxD.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return a @ b.T
