"""Chunked memory models (docs/memory_models.md): kind 'memory' and the recurrent-memory baseline 'rmt'.

A data row holds N = s·n tokens (s = ``model.chunks``, n = ``model.n_ctx``); chunk c is
t^(c) = t[c·n : (c+1)·n]. Both kinds return logits [B, s·n, V] whose entry c·n + i is the output at
chunk c's token slot i, i.e. the prediction of t^(c)_{i+1} (the chunked objectives in
``objectives.py`` shift within each chunk).

**'memory'** (:class:`MemoryLM`):

* encoder (a MaskedMixerLM or TransformerLM of length n, used through ``embed_tokens`` + ``hidden``
  only, so it has no head parameters) runs on chunks 0..s−2, each independently, in one batched call
  [B·(s−1), n]; m_c = hidden[:, encoder.position] -> :class:`Bottleneck` (compress / quantize / noise
  / bridge d_enc -> d_dec).
* decoder (its own embedding and head; a mixer of mixing length n + s or a transformer) runs all s
  chunks in one batched pass [B·s, s + n, d_dec] on X^(c) = [m_0..m_{c−1}, f×(s−c), E t^(c)], with
  fill f = 0 for mixer decoders and 1 (all ones) for transformer decoders ("fixed slots").
* ``memory_slots='variable'`` (transformer decoders): the input is [m_0..m_{c−1}, E t^(c)] of length
  c + n. It is computed in the same s + n layout with RoPE positions 0..c−1 for the memories and
  c..c+n−1 for the tokens, and an attention mask that hides the s−c unused slots from every other
  position (each unused slot still attends to itself, so no softmax row is empty); this equals the
  variable-length input exactly (tested against a per-chunk loop).
* ``use_memory=False`` (no-memory control, docs/memory_models.md#controls):
  every slot holds f and the encoder is not
  run. Its parameters (``encoder``, ``bottleneck``) are still created at ``init``, so the parameter
  tree, checkpoints and ``train.frozen``/``init_map`` groups are the same with and without memory;
  they receive zero gradients.

Step form (``init_cache`` / ``step``, docs/memory_models.md#generation-with-memories): one token
at stream position p = c·n + i; at i = 0 chunk c−1 is encoded once into slot c−1 and the decoder
cache is primed with the slots; the token enters the decoder at position s + i (variable: c + i).
Equals the parallel logits[:, p] up to float rounding.

Parameter groups: ``encoder`` (embed + blocks [+ final_norm]), ``bottleneck`` (down/up/bridge, as
needed), ``decoder`` (embed + blocks [+ final_norm] + head).

**'rmt'** (:class:`RecurrentMemoryLM`, docs/memory_models.md#recurrent-memory-baseline):
one decoder and a state
r ∈ ℝ^d, r_0 = f. Per chunk: token embeddings, the last one overwritten by r when
``rmt_overwrite``, r prepended (length n + 1); r <- decoder hidden state at the last position;
outputs 1..n are the token slots. ``nn.scan`` (a lifted ``jax.lax.scan``) over chunks with full
backpropagation through time. Parameter group: ``decoder``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models.bottleneck import Bottleneck, EmbeddingSpec

Array = jax.Array
ACT = ("batch", "length", "act_embed")


def fixed_slots(m_BxCxD: Array | None, fill_D: Array, chunks: int) -> Array:
    """Memory slots of every chunk: slots_BxSxSxD[b, c, j] = m_j if j < c else f.

    ``m_BxCxD`` holds the memories of chunks 0..s−2 (C = s−1); None gives all-fill slots
    [1, s, s, D].
    """
    s = int(chunks)
    if m_BxCxD is None:
        return jnp.broadcast_to(fill_D, (1, s, s, fill_D.shape[-1]))
    b, _, d = m_BxCxD.shape
    m_BxSxD = jnp.concatenate([m_BxCxD, jnp.broadcast_to(fill_D, (b, 1, d))], axis=1)
    used_SxS = jnp.arange(s)[None, :] < jnp.arange(s)[:, None]  # [chunk c, slot j]: j < c
    return jnp.where(used_SxS[None, :, :, None], m_BxSxD[:, None, :, :], fill_D)


def variable_layout(chunks: int, n: int) -> tuple[Array, Array]:
    """RoPE positions [s, s+n] and attention mask [s, s+n, s+n] that make the fixed s + n layout of
    chunk c compute exactly the variable-length input [m_0..m_{c−1}, E t^(c)]."""
    s, t = int(chunks), int(chunks) + int(n)
    c_S1 = jnp.arange(s)[:, None]
    slot_1xT = jnp.arange(t)[None, :]
    positions_SxT = jnp.where(slot_1xT < s, slot_1xT, slot_1xT - s + c_S1)
    valid_SxT = (slot_1xT < c_S1) | (slot_1xT >= s)  # memories of earlier chunks and tokens
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    eye_TxT = jnp.eye(t, dtype=bool)
    mask_SxTxT = causal_TxT[None] & (valid_SxT[:, None, :] | eye_TxT[None])
    return positions_SxT, mask_SxTxT


class MemoryLM(nn.Module):
    """Chunked memory model: tokens [B, s·n] -> logits [B, s·n, V] (docs/memory_models.md; module docstring).

    ``encoder`` / ``decoder`` are built by ``models.build_model`` from
    ``config.sub_model_config(model, role)`` with lengths n and n + s. Methods for tests and tools: ``embed_encoder`` (tokens -> encoder input
    embeddings of chunks 0..s−2), ``encode`` (those embeddings -> memories), ``embed_decoder``
    (tokens -> decoder token embeddings per chunk), ``decode`` (embeddings, memories -> logits).
    """

    encoder: nn.Module
    decoder: nn.Module
    n_ctx: int
    chunks: int
    d_encoder: int
    d_decoder: int
    embedding: EmbeddingSpec
    fill: float = 0.0
    use_memory: bool = True
    variable_slots: bool = False

    def setup(self):
        self.bottleneck = Bottleneck(
            d_in=self.d_encoder, compression=self.embedding.compression, d_out=self.d_decoder,
            **self.embedding.bottleneck_fields(),
        )

    def _chunked(self, tokens_BxL: Array) -> Array:
        b, length = tokens_BxL.shape
        s, n = self.chunks, self.n_ctx
        if length != s * n:
            raise UserError(f"memory model rows hold chunks x n_ctx = {s}x{n} tokens, got {length}")
        return tokens_BxL.reshape(b, s, n)

    def embed_encoder(self, tokens_BxL: Array) -> Array:
        """Encoder input embeddings of chunks 0..s−2: [B, s−1, n, d_enc]."""
        t_BxSxN = self._chunked(tokens_BxL)
        b, s, n = t_BxSxN.shape
        x = self.encoder.embed_tokens(t_BxSxN[:, : s - 1].reshape(b * (s - 1), n))
        return x.reshape(b, s - 1, n, -1)

    def encode(self, xe_BxCxNxD: Array) -> Array:
        """Encoder input embeddings [B, C, n, d_enc] -> memories [B, C, d_dec], chunks independent."""
        b, c, n, d = xe_BxCxNxD.shape
        h = self.encoder.hidden(xe_BxCxNxD.reshape(b * c, n, d))
        m = self.bottleneck(h[:, self.embedding.position])
        return m.reshape(b, c, -1).astype(self.embedding.dtype)

    def embed_decoder(self, tokens_BxL: Array) -> Array:
        """Decoder token embeddings per chunk: [B, s, n, d_dec]."""
        return self.decoder.embed(self._chunked(tokens_BxL))

    def decode(self, xd_BxSxNxD: Array, m_BxCxD: Array | None, first: int = 0) -> Array:
        """Chunks first..s−1 in one batched decoder pass -> logits [B, (s−first)·n, V] at the
        token slots.

        ``xd_BxSxNxD``: the decoder token embeddings of those chunks [B, s−first, n, d];
        ``m_BxCxD``: memories of chunks 0..s−2, or None for the no-memory control (all slots f)."""
        b, _, n, d = xd_BxSxNxD.shape
        s = self.chunks
        rows = s - first  # chunks decoded
        xd_BxSxNxD = xd_BxSxNxD.astype(self.embedding.dtype)
        fill_D = jnp.full((d,), self.fill, self.embedding.dtype)
        slots = fixed_slots(None if m_BxCxD is None else m_BxCxD.astype(self.embedding.dtype), fill_D, s)
        if first:
            slots = slots[:, first:]
        slots_BxSxSxD = jnp.broadcast_to(slots, (b, rows, s, d))
        x = jnp.concatenate([slots_BxSxSxD, xd_BxSxNxD], axis=2).reshape(b * rows, s + n, d)
        x = nn.with_logical_constraint(x, ACT)
        if self.variable_slots:
            pos_SxT, mask_SxTxT = variable_layout(s, n)
            if first:
                pos_SxT, mask_SxTxT = pos_SxT[first:], mask_SxTxT[first:]
            pos = jnp.broadcast_to(pos_SxT[None], (b, rows, s + n)).reshape(b * rows, s + n)
            mask = jnp.broadcast_to(mask_SxTxT[None], (b, rows, s + n, s + n))
            mask = mask.reshape(b * rows, 1, s + n, s + n)
            h = self.decoder.hidden(x, positions_BxN=pos, mask_Bx1xNxN=mask)
        else:
            h = self.decoder.hidden(x)
        h_BxLxD = h[:, s:].reshape(b, rows * n, d)
        return self.decoder.logits(nn.with_logical_constraint(h_BxLxD, ACT))

    def memories(self, tokens_BxL: Array) -> Array | None:
        """Memories of chunks 0..s−2 [B, s−1, d_dec]; None for the no-memory control (whose
        encoder parameters are still created at init, module docstring)."""
        m = None
        if self.use_memory or self.is_initializing():
            m = self.encode(self.embed_encoder(tokens_BxL))
        return m if self.use_memory else None

    def __call__(self, tokens_BxL: Array, copy_BxL: Array | None = None, copy_first: int = 0):
        """logits [B, s·n, V] of ``tokens_BxL``; with ``copy_BxL`` (the second pass of the combined
        objective, docs/objectives.md#combined) the pair (those logits, the logits of ``copy_BxL``
        at chunks copy_first..s−1 [B, (s−copy_first)·n, V]) computed with shared work: chunks
        0..copy_first−1 of ``copy_BxL`` must be those of ``tokens_BxL``, so their memories are
        reused and only chunks copy_first..s−2 are encoded again; chunks before ``copy_first`` are
        not decoded (the caller counts no target there). Mathematically the same logits as two
        calls; with QAT noise or dropout the shared chunks share their draws."""
        m = self.memories(tokens_BxL)
        logits = self.decode(self.embed_decoder(tokens_BxL), m)
        if copy_BxL is None:
            return logits
        first = int(copy_first)
        if not 0 <= first < self.chunks:
            raise ValueError(f"copy_first must be in [0, {self.chunks}), got {first}")
        m_copy = m
        if m is not None and first < self.chunks - 1:
            fresh = self.encode(self.embed_encoder(copy_BxL)[:, first:])
            m_copy = jnp.concatenate([m[:, :first], fresh], axis=1) if first else fresh
        copy_logits = self.decode(self.embed_decoder(copy_BxL)[:, first:], m_copy, first)
        return logits, copy_logits


    # ----- step form (generation / compression past one chunk) -----

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> dict:
        """The state of :meth:`step`: ``slots`` [B, s, d_dec] (m_j once chunk j is encoded, f
        before), ``chunk`` [B, n] int32 (the current chunk's tokens, encoded when it fills) and
        ``decoder`` (the decoder's own step cache over its s + n positions)."""
        d = self.d_decoder
        return {"slots": jnp.full((batch, self.chunks, d), self.fill, self.embedding.dtype),
                "chunk": jnp.zeros((batch, self.n_ctx), jnp.int32),
                "decoder": self.decoder.init_cache(batch, mode)}

    def _start_chunk(self, cache: dict, c: Array) -> dict:
        """At token 0 of chunk c: m_{c−1} = encode(chunk c−1) into slot c−1 (c ≥ 1, with memory),
        then a fresh decoder cache primed with the s slots at positions 0..s−1 (fixed slots) or
        the c used ones at 0..c−1 (variable slots)."""
        slots = cache["slots"]
        b, s, d = slots.shape
        if self.use_memory:
            xe = self.encoder.embed_tokens(cache["chunk"])[:, None]
            m_BxD = self.encode(xe)[:, 0]
            slots = jnp.where(c > 0, jax.lax.dynamic_update_index_in_dim(
                slots, m_BxD, jnp.maximum(c - 1, 0), axis=1), slots)
        dec = jax.tree.map(jnp.zeros_like, cache["decoder"])
        for j in range(s):
            _, primed = self.decoder.step_embedded(slots[:, j], jnp.int32(j), dec)
            dec = primed if not self.variable_slots else jax.tree.map(
                lambda new, old: jnp.where(j < c, new, old), primed, dec)
        return dict(cache, slots=slots, decoder=dec)

    def step(self, tokens_B: Array, pos: Array, cache: dict) -> tuple[Array, dict]:
        """Token [B] at stream position ``pos`` (0 ≤ pos < s·n) -> (logits [B, V] for the next
        token, new cache). Equals ``self(tokens)[:, pos]`` when positions 0..pos−1 were fed in
        order: chunk c = pos // n, slot i = pos mod n; at i = 0 the previous chunk becomes a memory
        and the decoder restarts on the slots (:meth:`_start_chunk`); the token then enters the
        decoder at position s + i (variable slots: c + i)."""
        n, s = self.n_ctx, self.chunks
        pos = jnp.asarray(pos, jnp.int32)
        c, i = pos // n, pos % n
        cache = nn.cond(i == 0, lambda mdl, cc: mdl._start_chunk(cc, c), lambda mdl, cc: cc,
                        self, cache)
        x_BxD = self.decoder.embed(tokens_B).astype(self.embedding.dtype)
        dec_pos = (c if self.variable_slots else s) + i
        logits, dec = self.decoder.step_embedded(x_BxD, dec_pos, cache["decoder"])
        chunk = jax.lax.dynamic_update_index_in_dim(cache["chunk"], tokens_B.astype(jnp.int32), i,
                                                    axis=1)
        return logits, dict(cache, chunk=chunk, decoder=dec)


class RecurrentMemoryLM(nn.Module):
    """RMT-like baseline: tokens [B, s·n] -> logits [B, s·n, V]
    (docs/memory_models.md#recurrent-memory-baseline).

    ``embed`` (tokens -> per-chunk token embeddings) and ``run`` (embeddings -> logits) split the
    forward for gradient tests."""

    decoder: nn.Module  # length n + 1
    n_ctx: int
    chunks: int
    d_model: int
    fill: float = 0.0
    overwrite: bool = True
    dtype: Any = jnp.float32

    def embed(self, tokens_BxL: Array) -> Array:
        """Decoder token embeddings per chunk: [B, s, n, d]."""
        b, length = tokens_BxL.shape
        s, n = self.chunks, self.n_ctx
        if length != s * n:
            raise UserError(f"rmt rows hold chunks x n_ctx = {s}x{n} tokens, got {length}")
        return self.decoder.embed(tokens_BxL.reshape(b, s, n))

    def run(self, x_BxSxNxD: Array) -> Array:
        """Token embeddings per chunk -> logits [B, s·n, V], one decoder pass per chunk in a scan."""
        b, s, n, d = x_BxSxNxD.shape
        overwrite = self.overwrite

        def chunk(mdl, r_BxD, x_BxNxD):
            if overwrite:
                x_BxNxD = x_BxNxD.at[:, -1].set(r_BxD)
            x = jnp.concatenate([r_BxD[:, None], x_BxNxD], axis=1)
            h = mdl.hidden(nn.with_logical_constraint(x, ACT))
            return h[:, -1], h[:, 1:]

        scan = nn.scan(chunk, variable_broadcast="params", split_rngs={"params": False})
        r0_BxD = jnp.full((b, d), self.fill, self.dtype)
        x_SxBxNxD = jnp.moveaxis(x_BxSxNxD.astype(self.dtype), 1, 0)
        _, h_SxBxNxD = scan(self.decoder, r0_BxD, x_SxBxNxD)
        h_BxLxD = jnp.moveaxis(h_SxBxNxD, 0, 1).reshape(b, s * n, d)
        return self.decoder.logits(nn.with_logical_constraint(h_BxLxD, ACT))

    def __call__(self, tokens_BxL: Array) -> Array:
        return self.run(self.embed(tokens_BxL))

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached"):
        raise UserError("the recurrent-memory baseline (model.kind='rmt') has no step form; "
                        "generate with --mode=full")
