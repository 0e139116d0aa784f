"""Attribution of a memory model's or an embedding-augmented LM's outputs to its memory
(docs/analysis.md#attribution).

With z = the decoder's output logits [B, L, V] and m the memory (embedding_clm: the injected
vector, one slot; memory: the memories m_0..m_{s−2} of the earlier chunks, one slot each):

* **occlusion** of slot j: m_j is replaced by the model's fill value (0 for mixers and embedding
  LMs, the all-ones fill of a transformer memory decoder), giving z^occ; per output position i
  ``l1`` = ‖z_i − z_i^occ‖₁ and ``cos`` = 1 − cos(z_i, z_i^occ) ∈ [0, 2];
* **noise shift**: m_j + 2⁻²·u, u ~ U(0, 1) per number, scored like occlusion (L1);
* **gradient × input**: g_i = ∂(Σ_v |z_{i,v}|)/∂m_j, one backward pass per position (``jax.jacrev``:
  a vmapped vector-Jacobian product), the attribution vector g_i ⊙ m_j and its score Σ_d |(g_i ⊙ m_j)_d|.

Scores are min–max normalized over the positions whose target is a real token
(:func:`min_max`). Output i predicts token i+1 (within its chunk), so :func:`to_tokens` shifts
the scores right by one to draw them over the tokens they predict. The **entropy-weighted CLM**
weights (:func:`entropy_weights`) are w_i = 1 − ê_i with ê the normalized occlusion L1 score:
tokens the memory explains well (high attribution) count less.

The model is reached through :class:`MemoryAccess`, built from any ``apply(params, *args,
method=...)`` (a bare ``model.apply`` or the trainer's sharded ``apply_fn``), so the objectives and
the ``probe`` command share it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mixers_jax.config import field
from mixers_jax.errors import UserError

Array = jax.Array
MEMORY_KINDS = ("embedding_clm", "memory")
NOISE_SCALE = 0.25  # 2^-2


def _encode_memories(module, tokens_BxL):
    return module.encode(module.embed_encoder(tokens_BxL))


def _decode_memories(module, tokens_BxL, m_BxCxD):
    return module.decode(module.embed_decoder(tokens_BxL), m_BxCxD)


def _clm_memory(module, tokens_BxN):
    return module.memory(tokens_BxN)[:, None]


def _clm_decode(module, tokens_BxN, m_Bx1xD):
    return module.decode(tokens_BxN, m_Bx1xD[:, 0])


@dataclasses.dataclass(frozen=True)
class MemoryAccess:
    """The memory of a model: ``memory(params, tokens) -> m [B, C, D]`` (C slots) and
    ``decode(params, tokens, m) -> logits [B, L, V]``; ``fill``: the value of an empty slot;
    ``chunks``: chunks per row (1 for embedding_clm), whose boundaries the target shift respects."""

    apply: Callable
    kind: str
    fill: float
    chunks: int

    def memory(self, params, tokens_BxL: Array) -> Array:
        fn = _encode_memories if self.kind == "memory" else _clm_memory
        return self.apply(params, tokens_BxL, method=fn)

    def decode(self, params, tokens_BxL: Array, m_BxCxD: Array) -> Array:
        fn = _decode_memories if self.kind == "memory" else _clm_decode
        return self.apply(params, tokens_BxL, m_BxCxD, method=fn)

    def occlude(self, m_BxCxD: Array, slot: int) -> Array:
        """m with slot ``slot`` set to the fill value."""
        return m_BxCxD.at[:, slot].set(jnp.asarray(self.fill, m_BxCxD.dtype))


def memory_access(model_cfg, apply: Callable) -> MemoryAccess:
    """The :class:`MemoryAccess` of a model of ``model_cfg``; ``UserError`` for a model without memory."""
    kind = field(model_cfg, "kind")
    if kind not in MEMORY_KINDS:
        raise UserError(f"model.kind {kind!r} has no memory to attribute to; attribution takes "
                        f"an embedding-augmented LM or a memory model ({', '.join(MEMORY_KINDS)})")
    if kind == "memory" and not field(model_cfg, "use_memory", True):
        raise UserError("the model is a no-memory control (model.use_memory=False): it has no "
                        "memory to attribute to")
    decoder_kind = field(field(model_cfg, "decoder") or {}, "kind", None) or field(model_cfg, "kind")
    fill = 1.0 if kind == "memory" and decoder_kind == "transformer" else 0.0
    chunks = int(field(model_cfg, "chunks")) if kind == "memory" else 1
    return MemoryAccess(apply=apply, kind=kind, fill=fill, chunks=chunks)


def bare_apply(model) -> Callable:
    """``apply(params, *args, method=...)`` over a Flax module, no RNGs."""
    return lambda params, *args, method=None: model.apply({"params": params}, *args, method=method)


def check_slot(slot: int, m_BxCxD: Array) -> int:
    slots = m_BxCxD.shape[1]
    if not 0 <= slot < slots:
        raise UserError(f"memory slot {slot} does not exist: the model has slots 0..{slots - 1}")
    return slot


def target_valid(tokens_BxL: Array, pad_id: int, chunks: int = 1) -> Array:
    """float [B, L]: 1 where output i predicts a real (non-pad) token i+1 of its own chunk."""
    b, length = tokens_BxL.shape
    n = length // chunks
    real = (tokens_BxL != pad_id).reshape(b, chunks, n)
    valid = jnp.concatenate([real[:, :, 1:], jnp.zeros((b, chunks, 1), bool)], axis=2)
    return valid.reshape(b, length).astype(jnp.float32)


def output_distances(z_BxLxV: Array, z_alt_BxLxV: Array) -> dict[str, Array]:
    """Per position: ``l1`` = ‖z − z'‖₁ and ``cos`` = 1 − cos(z, z') (float32 [B, L])."""
    z, w = z_BxLxV.astype(jnp.float32), z_alt_BxLxV.astype(jnp.float32)

    def unit(a):
        return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-30)

    # 1 − cos = ½‖z/‖z‖ − z'/‖z'‖‖², exactly 0 for equal vectors
    return {"l1": jnp.sum(jnp.abs(z - w), -1), "cos": 0.5 * jnp.sum((unit(z) - unit(w)) ** 2, -1)}


def min_max(scores_BxL: Array, valid_BxL: Array) -> Array:
    """(s − min)/(max − min) per row over the valid positions; 0 elsewhere and for a constant row."""
    valid = valid_BxL > 0
    lo = jnp.min(jnp.where(valid, scores_BxL, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(valid, scores_BxL, -jnp.inf), axis=-1, keepdims=True)
    span = hi - lo
    norm = jnp.where(span > 0, (scores_BxL - lo) / jnp.where(span > 0, span, 1.0), 0.0)
    return jnp.where(valid, norm, 0.0)


def to_tokens(scores_BxL: Array, chunks: int = 1) -> Array:
    """Scores of output i moved to token i+1 of the same chunk (what output i predicts); the first
    token of each chunk, which no output predicts, gets NaN."""
    b, length = scores_BxL.shape
    s = scores_BxL.reshape(b, chunks, length // chunks).astype(jnp.float32)
    s = jnp.concatenate([jnp.full((b, chunks, 1), jnp.nan), s[:, :, :-1]], axis=2)
    return s.reshape(b, length)


def occlusion(access: MemoryAccess, params, tokens_BxL: Array, slot: int = 0) -> dict[str, Array]:
    """Occlusion of slot ``slot``: raw ``l1`` and ``cos`` scores per output position."""
    m = access.memory(params, tokens_BxL)
    check_slot(slot, m)
    z = access.decode(params, tokens_BxL, m)
    z_occ = access.decode(params, tokens_BxL, access.occlude(m, slot))
    return output_distances(z, z_occ)


def noise_shift(access: MemoryAccess, params, tokens_BxL: Array, key: Array, slot: int = 0,
                scale: float = NOISE_SCALE) -> Array:
    """L1 output shift per position when slot ``slot`` gets ``scale``·U(0, 1) noise added."""
    m = access.memory(params, tokens_BxL)
    check_slot(slot, m)
    u = jax.random.uniform(key, m[:, slot].shape, jnp.float32)
    noisy = m.at[:, slot].add((scale * u).astype(m.dtype))
    return output_distances(access.decode(params, tokens_BxL, m),
                            access.decode(params, tokens_BxL, noisy))["l1"]


def abs_logit_sums(access: MemoryAccess, params, tokens_BxL: Array, m_BxCxD: Array) -> Array:
    """Σ_v |z_{i,v}| per position [B, L]: the quantity gradient × input differentiates."""
    return jnp.sum(jnp.abs(access.decode(params, tokens_BxL, m_BxCxD).astype(jnp.float32)), -1)


def gradient_x_input(access: MemoryAccess, params, tokens_BxL: Array, slot: int = 0
                     ) -> tuple[Array, Array]:
    """(vectors [B, L, D] = (∂ Σ_v |z_{i,v}| / ∂m_slot) ⊙ m_slot, scores [B, L] = Σ_d |vector|)."""
    m = access.memory(params, tokens_BxL)
    check_slot(slot, m)

    def per_row(tokens_L, m_CxD):
        def sums(m_slot_D):
            return abs_logit_sums(access, params, tokens_L[None], m_CxD.at[slot].set(m_slot_D)[None])[0]

        m_slot = m_CxD[slot].astype(jnp.float32)
        return jax.jacrev(sums)(m_slot) * m_slot[None, :]

    vectors = jax.vmap(per_row)(tokens_BxL, m)
    return vectors, jnp.sum(jnp.abs(vectors), -1)


def entropy_weights(z_BxLxV: Array, z_occ_BxLxV: Array, valid_BxL: Array) -> Array:
    """w = 1 − ê per output position, ê the min–max normalized occlusion L1 score (no gradient)."""
    score = jax.lax.stop_gradient(output_distances(z_BxLxV, z_occ_BxLxV)["l1"])
    return 1.0 - min_max(score, valid_BxL)


def all_scores(access: MemoryAccess, params, tokens_BxL: Array, pad_id: int, slot: int = 0,
               seed: int = 0) -> dict[str, Any]:
    """Every attribution of slot ``slot`` for ``tokens``: raw and normalized (over the valid
    positions) per-output scores, and the normalized scores moved onto the predicted tokens."""
    valid = target_valid(tokens_BxL, pad_id, access.chunks)
    raw = dict(occlusion(access, params, tokens_BxL, slot))
    raw["noise"] = noise_shift(access, params, tokens_BxL, jax.random.key(seed), slot)
    raw["grad_x_input"] = gradient_x_input(access, params, tokens_BxL, slot)[1]
    normalized = {k: min_max(v, valid) for k, v in raw.items()}
    on_tokens = {k: to_tokens(jnp.where(valid > 0, v, jnp.nan), access.chunks)
                 for k, v in normalized.items()}
    return {"raw": raw, "normalized": normalized, "on_tokens": on_tokens, "valid": valid}
