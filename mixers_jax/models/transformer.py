"""Llama-style transformer baseline (REFERENCE §3).

embedding -> L x [x += Attn(RMSNorm x); x += SwiGLU(RMSNorm x)] -> final RMSNorm -> head (no bias).
Full multi-head attention (no GQA), no biases anywhere, RoPE (θ = rope_theta, HF "rotate-half"
layout), RMSNorm eps 1e-6, SwiGLU intermediate mlp_ratio·d, every weight ~ N(0, 0.02²).
Causal attention is ``jax.nn.dot_product_attention(q, k, v, is_causal=True)``; inputs may be
shorter than n_ctx (RoPE positions 0..n−1); ``causal=False`` makes it bidirectional
(``is_causal=False``, for encoders, REFERENCE §4; no step form). ``hidden(x, positions=, mask=)``
optionally takes explicit RoPE positions [B, n] and a boolean attention mask [B, 1, n, n] (True =
may attend; it replaces the causal mask, so it must include causality): memory models use them to
lay out variable-length inputs in one fixed-length batch (REFERENCE §6 "Variable positions").

Parameter tree and the Hugging Face ``LlamaForCausalLM`` state dict (HF Linear weights are [out, in]):

    embed/embedding [V, d]                     model.embed_tokens.weight
    block_{i}/attn_norm/scale [d]              model.layers.{i}.input_layernorm.weight
    block_{i}/attn/{q,k,v}/kernel [d, H, hd]   ...self_attn.{q,k,v}_proj.weight.T.reshape(d, H, hd)
    block_{i}/attn/o/kernel [H, hd, d]         ...self_attn.o_proj.weight.T.reshape(H, hd, d)
    block_{i}/mlp_norm/scale [d]               model.layers.{i}.post_attention_layernorm.weight
    block_{i}/mlp/{gate,up}/kernel [d, F]      ...mlp.{gate,up}_proj.weight.T
    block_{i}/mlp/down/kernel [F, d]           ...mlp.down_proj.weight.T
    final_norm/scale [d]                       model.norm.weight
    head/kernel [d, V]                         lm_head.weight.T   (absent if tied)

Step form with a KV cache: ``model.init_cache(batch)`` gives per layer ``k``, ``v`` [B, n_ctx, H, hd]
(keys after RoPE); ``model.apply(vars, tokens_B, pos, cache, method='step')`` -> (logits [B, V],
cache) attends from position ``pos`` to the cached positions ≤ pos.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers

Array = jax.Array
Dtype = Any


def rope_cos_sin(n: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [n, head_dim] for positions 0..n−1: angle(p, i) = p·θ^(−2i/hd), halves repeated."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_NxK2 = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_NxK = jnp.concatenate([angles_NxK2, angles_NxK2], axis=-1)
    return jnp.cos(angles_NxK), jnp.sin(angles_NxK)


def rope_cos_sin_at(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [..., head_dim] at explicit (integer) ``positions`` [...]; see :func:`rope_cos_sin`."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxNxHxK: Array, cos_NxK: Array, sin_NxK: Array) -> Array:
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁] (HF Llama layout), in float32.

    cos/sin are [N, K] (shared by the batch) or [B, N, K] (per-row positions)."""
    x = x_BxNxHxK.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    if cos_NxK.ndim == 3:
        cos, sin = cos_NxK[:, :, None, :], sin_NxK[:, :, None, :]
    else:
        cos, sin = cos_NxK[None, :, None, :], sin_NxK[None, :, None, :]
    return (x * cos + rotated * sin).astype(x_BxNxHxK.dtype)


class Attention(nn.Module):
    """Causal (``causal=False``: bidirectional) multi-head self-attention with RoPE, no biases."""

    d_model: int
    n_heads: int
    rope_theta: float = 10000.0
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BxNxD: Array, pos: Array | None = None, cache: dict | None = None,
                 positions_BxN: Array | None = None, mask_Bx1xNxN: Array | None = None):
        h, hd = self.n_heads, self.d_model // self.n_heads
        kw = dict(use_bias=False, kernel_init=layers.normal(0.02), dtype=self.dtype)
        proj_axes = ("embed", "heads", "head_dim")
        q_BxNxHxK = layers.Linear((h, hd), proj_axes, name="q", **kw)(x_BxNxD)
        k_BxNxHxK = layers.Linear((h, hd), proj_axes, name="k", **kw)(x_BxNxD)
        v_BxNxHxK = layers.Linear((h, hd), proj_axes, name="v", **kw)(x_BxNxD)
        def out(a):
            o = layers.Linear((self.d_model,), ("heads", "head_dim", "embed"), n_in=2, name="o", **kw)
            return o(a)

        if cache is not None:  # one position: x [B, d], q/k/v [B, H, hd]
            n = cache["k"].shape[1]
            cos, sin = rope_cos_sin(n, hd, self.rope_theta)
            cos_1xK = jax.lax.dynamic_slice_in_dim(cos, pos, 1, axis=0)
            sin_1xK = jax.lax.dynamic_slice_in_dim(sin, pos, 1, axis=0)
            q_BxHxK = apply_rope(q_BxNxHxK[:, None], cos_1xK, sin_1xK)[:, 0]
            k_BxHxK = apply_rope(k_BxNxHxK[:, None], cos_1xK, sin_1xK)[:, 0]
            k_cache = jax.lax.dynamic_update_index_in_dim(
                cache["k"], k_BxHxK.astype(cache["k"].dtype), pos, axis=1)
            v_cache = jax.lax.dynamic_update_index_in_dim(
                cache["v"], v_BxNxHxK.astype(cache["v"].dtype), pos, axis=1)
            scores = jnp.einsum("bhk,bjhk->bhj", q_BxHxK.astype(jnp.float32),
                                k_cache.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
            scores = jnp.where(jnp.arange(n)[None, None, :] <= pos, scores, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1)
            a_BxHxK = jnp.einsum("bhj,bjhk->bhk", probs, v_cache.astype(jnp.float32))
            return out(a_BxHxK.astype(self.dtype)), {"k": k_cache, "v": v_cache}
        if positions_BxN is None:
            cos, sin = rope_cos_sin(x_BxNxD.shape[1], hd, self.rope_theta)
        else:
            cos, sin = rope_cos_sin_at(positions_BxN, hd, self.rope_theta)
        q_BxNxHxK = apply_rope(q_BxNxHxK, cos, sin)
        k_BxNxHxK = apply_rope(k_BxNxHxK, cos, sin)
        if mask_Bx1xNxN is None:
            a_BxNxHxK = jax.nn.dot_product_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK,
                                                     is_causal=self.causal)
        else:
            a_BxNxHxK = jax.nn.dot_product_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK,
                                                     mask=mask_Bx1xNxN)
        a_BxNxHxK = nn.with_logical_constraint(a_BxNxHxK, ("batch", "length", "act_heads", None))
        return out(a_BxNxHxK)


class TransformerBlock(nn.Module):
    d_model: int
    n_heads: int
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BxNxD: Array, pos: Array | None = None, cache: dict | None = None,
                 positions_BxN: Array | None = None, mask_Bx1xNxN: Array | None = None):
        step = cache is not None
        names = ("batch", "length", "act_embed")
        h = layers.rms_norm(self.dtype, name="attn_norm")(x_BxNxD)
        attn = Attention(self.d_model, self.n_heads, self.rope_theta, self.dtype,
                         causal=self.causal, name="attn")
        if step:
            h, cache = attn(h, pos, cache)
            x_BxNxD = x_BxNxD + h
        else:
            h = attn(h, positions_BxN=positions_BxN, mask_Bx1xNxN=mask_Bx1xNxN)
            x_BxNxD = nn.with_logical_constraint(x_BxNxD + h, names)
        h = layers.rms_norm(self.dtype, name="mlp_norm")(x_BxNxD)
        h = layers.SwiGLU(self.d_model, self.mlp_ratio * self.d_model, self.dtype, name="mlp")(h)
        if step:
            return x_BxNxD + h, cache
        return nn.with_logical_constraint(x_BxNxD + h, names)


class TransformerLM(nn.Module):
    """Llama-style causal LM: tokens [B, n ≤ n_ctx] int32 -> logits [B, n, V] float32."""

    vocab_size: int
    n_ctx: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: Dtype = jnp.float32
    causal: bool = True  # False: bidirectional attention (encoders); no step form

    def setup(self):
        self.embed = layers.Embed(self.vocab_size, self.d_model, layers.normal(0.02), self.dtype)
        self.blocks = tuple(
            TransformerBlock(
                self.d_model,
                self.n_heads,
                self.mlp_ratio,
                self.rope_theta,
                self.dtype,
                causal=self.causal,
                name=f"block_{i}",
            )
            for i in range(self.n_layers)
        )
        self.final_norm = layers.rms_norm(self.dtype)
        if not self.tie_embeddings:
            self.head = layers.Linear(
                (self.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                kernel_init=layers.normal(0.02),
                dtype=self.dtype,
                out_dtype=jnp.float32,
            )

    def embed_tokens(self, tokens_BxN: Array) -> Array:
        if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] > self.n_ctx:
            raise UserError(
                f"the transformer takes at most n_ctx={self.n_ctx} tokens per row; got input of "
                f"shape {tuple(tokens_BxN.shape)}"
            )
        x_BxNxD = self.embed(tokens_BxN)
        return nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))

    def hidden(self, x_BxNxD: Array, positions_BxN: Array | None = None,
               mask_Bx1xNxN: Array | None = None) -> Array:
        """Block outputs followed by the final RMSNorm. Optional RoPE ``positions_BxN`` (default
        0..n−1) and boolean attention mask (default causal; a given mask must include causality)."""
        for block in self.blocks:
            x_BxNxD = block(x_BxNxD, positions_BxN=positions_BxN, mask_Bx1xNxN=mask_Bx1xNxN)
        return self.final_norm(x_BxNxD)

    def logits(self, h_BxNxD: Array) -> Array:
        if self.tie_embeddings:
            return self.embed.attend(h_BxNxD)
        return self.head(h_BxNxD)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.logits(self.hidden(self.embed_tokens(tokens_BxN)))

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> tuple:
        """KV cache per layer: k, v [B, n_ctx, H, hd] in the compute dtype."""
        if not self.causal:
            raise UserError(
                "a bidirectional (model.causal=False) transformer has no step form (generation / "
                "compression need causal attention)"
            )
        if mode != "cached":
            raise ValueError(f"the transformer has only the 'cached' (KV cache) step, not {mode!r}")
        shape = (batch, self.n_ctx, self.n_heads, self.d_model // self.n_heads)
        return tuple(
            {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
            for _ in range(self.n_layers)
        )

    def step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """Token [B] at position ``pos`` (scalar) -> (logits [B, V] float32, new KV cache)."""
        if not self.causal:
            raise UserError("a bidirectional (model.causal=False) transformer has no step form")
        x = self.embed(tokens_B)
        pos = jnp.asarray(pos, jnp.int32)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block(x, pos, c)
            new.append(c)
        return self.logits(self.final_norm(x)), tuple(new)
