"""Llama-style (or original-GPT) transformer baseline (docs/transformer_baseline.md).

embedding -> L x [x += Attn(RMSNorm x); x += SwiGLU(RMSNorm x)] -> final RMSNorm -> head (no bias).
Full multi-head attention (or grouped-query attention with ``n_kv_heads`` < ``n_heads``), no
biases anywhere, RoPE (θ = rope_theta, HF "rotate-half" layout, optional ``rope_scaling`` 'linear'
or 'llama3'), RMSNorm eps ``rms_eps`` (1e-6), SwiGLU intermediate mlp_ratio·d (or ``mlp_hidden``),
head width d/H (or ``head_dim``), every weight ~ N(0, 0.02²). Llama-family checkpoints load with
``mixers_jax.hf_llama`` (docs/hf_import.md).
Causal attention is ``jax.nn.dot_product_attention(q, k, v, is_causal=True)``; inputs may be
shorter than n_ctx (RoPE positions 0..n−1); ``causal=False`` makes it bidirectional
(``is_causal=False``, for encoders, docs/autoencoders.md#encoder-and-decoder-choices; no step form).
``hidden(x, positions=, mask=)``
optionally takes explicit RoPE positions [B, n] and a boolean attention mask [B, 1, n, n] (True =
may attend; it replaces the causal mask, so it must include causality): memory models use them to
lay out variable-length inputs in one fixed-length batch (docs/memory_models.md#variable-positions).

Parameter tree and the Hugging Face ``LlamaForCausalLM`` state dict (HF Linear weights are [out, in]):

    embed/embedding [V, d]                     model.embed_tokens.weight
    block_{i}/attn_norm/scale [d]              model.layers.{i}.input_layernorm.weight
    block_{i}/attn/q/kernel [d, H, hd]         ...self_attn.q_proj.weight.T.reshape(d, H, hd)
    block_{i}/attn/{k,v}/kernel [d, G, hd]     ...self_attn.{k,v}_proj.weight.T.reshape(d, G, hd)
    block_{i}/attn/o/kernel [H, hd, d]         ...self_attn.o_proj.weight.T.reshape(H, hd, d)
    block_{i}/mlp_norm/scale [d]               model.layers.{i}.post_attention_layernorm.weight
    block_{i}/mlp/{gate,up}/kernel [d, F]      ...mlp.{gate,up}_proj.weight.T  (F = mlp_width)
    block_{i}/mlp/down/kernel [F, d]           ...mlp.down_proj.weight.T
    final_norm/scale [d]                       model.norm.weight
    head/kernel [d, V]                         lm_head.weight.T   (absent if tied)

With ``model.scan_layers`` the blocks are one scanned module: ``blocks/...`` holds every
``block_{i}/...`` parameter stacked along a leading layer axis.

``transformer='gpt'`` (``spec.gpt``) is the original-GPT layout instead: a learned position table
``pos_embed/embedding`` [n_ctx, d] added to the input of ``hidden`` (positions 0..n−1 or the
explicit ``positions``), no RoPE, LayerNorm (with bias) for ``attn_norm``/``mlp_norm``/
``final_norm``, the GELU (tanh) ``layers.MLP`` ``mlp/fc1`` d -> r·d, ``mlp/fc2`` r·d -> d, and
biases on q, k, v, o and both MLP layers (the LM head stays bias-free); N(0, 0.02²) weights, zero
biases. Parameter count (untied, mlp_ratio r):
V·d + n·d + L·(4d² + 4d + 2r·d² + r·d + d + 4d) + 2d + d·V
(embedding, positions, per block q/k/v/o + biases, fc1 + fc2 + biases, two LayerNorms; final
LayerNorm, head).

``hybrid='series' | 'parallel'`` adds ``block_{i}/mix/...`` (a :class:`TokenMixing`: flat
``w`` [n, n], ``c`` [n] by default) and, in series, ``block_{i}/mix_norm/scale``; see
:class:`TransformerBlock`. Its init is the mixer's unless ``hybrid_mix_init`` says otherwise
('small': w ~ N(0, σ²), c = 0; 'zero': the mixing's last map starts at zero); ``embed_init='unit'``
draws the token embedding N(0, 1) instead of N(0, 0.02²).

Step form with a KV cache: ``model.init_cache(batch)`` gives per layer ``k``, ``v`` [B, G, n_ctx, hd]
(keys after RoPE); ``model.apply(vars, tokens_B, pos, cache, method='step')`` -> (logits [B, V],
cache) attends from position ``pos`` to the cached positions ≤ pos. The cache is a ring (position p
in slot p mod n_ctx), so with RoPE ``pos`` may go past n_ctx: the step then attends to the last
n_ctx positions, a sliding window (attention depends on positions only through their differences,
which stay below n_ctx). GPT's learned positions end at n_ctx: it has no sliding step.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.specs import TransformerSpec

Array = jax.Array


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> Array:
    """ω_i = θ^(−2i/hd), i < hd/2, optionally rescaled (``TransformerSpec.rope``; docs/hf_import.md):

    * ('linear', f, ...): ω_i / f (position interpolation);
    * ('llama3', f, lo, hi, n₀, ...): with wavelength λ_i = 2π/ω_i, ω_i / f where λ_i > n₀/lo,
      ω_i where λ_i < n₀/hi, and in between (1−s)·ω_i/f + s·ω_i with s = (n₀/λ_i − lo)/(hi − lo).
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    kind, factor, low, high, n0 = scaling
    if kind == "linear":
        return inv_freq / factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > n0 / low, inv_freq / factor, inv_freq)
    smooth = (n0 / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= n0 / high) & (wavelen <= n0 / low)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(n: int, head_dim: int, theta: float, scaling: tuple | None = None
                 ) -> tuple[Array, Array]:
    """cos, sin [n, head_dim] for positions 0..n−1: angle(p, i) = p·ω_i (:func:`rope_inv_freq`),
    halves repeated."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles_NxK2 = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_NxK = jnp.concatenate([angles_NxK2, angles_NxK2], axis=-1)
    return jnp.cos(angles_NxK), jnp.sin(angles_NxK)


def rope_cos_sin_at(positions: Array, head_dim: int, theta: float, scaling: tuple | None = None
                    ) -> tuple[Array, Array]:
    """cos, sin [..., head_dim] at explicit (integer) ``positions`` [...]; see :func:`rope_cos_sin`."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    inv_freq = layers.leading_axes(inv_freq, positions.ndim + 1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def repeat_kv(x_BxNxGxK: Array, groups: int, axis: int = 2) -> Array:
    """Grouped-query attention: each of the G key/value heads serves ``groups`` consecutive query
    heads (query head j reads kv head j // groups, as Hugging Face's ``repeat_kv``)."""
    return x_BxNxGxK if groups == 1 else jnp.repeat(x_BxNxGxK, groups, axis=axis)


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
    """Causal (``causal=False``: bidirectional) multi-head self-attention with RoPE, no biases;
    with ``n_kv_heads`` < ``n_heads`` grouped-query attention (k, v have n_kv_heads heads, the KV
    cache too)."""

    spec: TransformerSpec

    @nn.compact
    def __call__(self, x_BxNxD: Array, pos: Array | None = None, cache: dict | None = None,
                 positions_BxN: Array | None = None, mask_Bx1xNxN: Array | None = None):
        spec = self.spec
        h, hd, g = spec.n_heads, spec.head_width, spec.kv_heads

        def linear(features, axes, name, **kw):
            return layers.Linear(features, axes, use_bias=spec.gpt, kernel_init=layers.normal(0.02),
                                 dtype=spec.dtype, name=name, **kw)

        proj_axes = ("embed", "heads", "head_dim")
        q_BxNxHxK = linear((h, hd), proj_axes, "q")(x_BxNxD)
        k_BxNxHxK = linear((g, hd), proj_axes, "k")(x_BxNxD)  # H = G heads (G < H: GQA)
        v_BxNxHxK = linear((g, hd), proj_axes, "v")(x_BxNxD)

        def out(a):
            return linear((spec.d_model,), ("heads", "head_dim", "embed"), "o", n_in=2)(a)

        if cache is not None:  # one position: x [B, d], q/k/v [B, H, hd]
            n = cache["k"].shape[2]
            q_BxHxK, k_BxHxK = q_BxNxHxK, k_BxNxHxK
            if not spec.gpt:  # RoPE at the absolute position (pos may pass n_ctx: sliding)
                cos_1xK, sin_1xK = rope_cos_sin_at(jnp.asarray(pos)[None], hd, spec.rope_theta,
                                                   spec.rope)
                q_BxHxK = apply_rope(q_BxNxHxK[:, None], cos_1xK, sin_1xK)[:, 0]
                k_BxHxK = apply_rope(k_BxNxHxK[:, None], cos_1xK, sin_1xK)[:, 0]
            slot = pos % n  # a ring: past n_ctx the oldest position is overwritten
            k_cache = jax.lax.dynamic_update_index_in_dim(
                cache["k"], k_BxHxK.astype(cache["k"].dtype), slot, axis=2)
            v_cache = jax.lax.dynamic_update_index_in_dim(
                cache["v"], v_BxNxHxK.astype(cache["v"].dtype), slot, axis=2)
            # [B, H, n, hd] caches: both products are batched matrix-vector products over (b, h)
            # with no transpose of the cache (a [B, n, H, hd] cache costs one per step on XLA:CPU)
            k_all, v_all = (repeat_kv(c, h // g, axis=1) for c in (k_cache, v_cache))
            scores = jnp.einsum("bhk,bhjk->bhj", q_BxHxK.astype(jnp.float32),
                                k_all.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
            scores = jnp.where(jnp.arange(n)[None, None, :] <= pos, scores, -jnp.inf)
            probs = jax.nn.softmax(scores, axis=-1)
            a_BxHxK = jnp.einsum("bhj,bhjk->bhk", probs, v_all.astype(jnp.float32))
            return out(a_BxHxK.astype(spec.dtype)), {"k": k_cache, "v": v_cache}
        if not spec.gpt:
            if positions_BxN is None:
                cos, sin = rope_cos_sin(x_BxNxD.shape[1], hd, spec.rope_theta, spec.rope)
            else:
                cos, sin = rope_cos_sin_at(positions_BxN, hd, spec.rope_theta, spec.rope)
            q_BxNxHxK = apply_rope(q_BxNxHxK, cos, sin)
            k_BxNxHxK = apply_rope(k_BxNxHxK, cos, sin)
        k_BxNxHxK, v_BxNxHxK = (repeat_kv(a, h // g) for a in (k_BxNxHxK, v_BxNxHxK))
        if spec.dtype == jnp.float16:  # fp16 scores overflow (XLA:CPU has no f16 attention): fp32 core
            q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = (
                a.astype(jnp.float32) for a in (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK))
        if spec.dropout_attn and self.has_rng("dropout"):
            a_BxNxHxK = self._attention_dropout(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask_Bx1xNxN)
        elif mask_Bx1xNxN is None:
            a_BxNxHxK = jax.nn.dot_product_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK,
                                                     is_causal=spec.causal)
        else:
            a_BxNxHxK = jax.nn.dot_product_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK,
                                                     mask=mask_Bx1xNxN)
        a_BxNxHxK = nn.with_logical_constraint(a_BxNxHxK, ("batch", "length", "act_heads", None))
        return out(a_BxNxHxK)

    def _attention_dropout(self, q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask_Bx1xNxN):
        """softmax(q·kᵀ/√hd + mask) with dropout on the probabilities, then ·v (float32 scores;
        the explicit form of ``dot_product_attention``, used only when attention dropout is on)."""
        n, hd = q_BxNxHxK.shape[1], q_BxNxHxK.shape[-1]
        scores_BxHxNxN = jnp.einsum("bihk,bjhk->bhij", q_BxNxHxK.astype(jnp.float32),
                                    k_BxNxHxK.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
        if mask_Bx1xNxN is None:
            mask_Bx1xNxN = (jnp.tril(jnp.ones((n, n), bool)) if self.spec.causal
                            else jnp.ones((n, n), bool))[None, None]
        probs = jax.nn.softmax(jnp.where(mask_Bx1xNxN, scores_BxHxNxN, -jnp.inf), axis=-1)
        probs = layers.dropout(self, probs, self.spec.dropout_attn)
        a_BxNxHxK = jnp.einsum("bhij,bjhk->bihk", probs, v_BxNxHxK.astype(jnp.float32))
        return a_BxNxHxK.astype(q_BxNxHxK.dtype)


def norm(spec: TransformerSpec, name: str | None = None) -> nn.Module:
    """RMSNorm (Llama) or LayerNorm with bias (GPT)."""
    if spec.gpt:
        return layers.layer_norm(spec.dtype, name=name)
    return layers.rms_norm(spec.dtype, name=name, eps=spec.rms_eps)


def mlp(spec: TransformerSpec) -> nn.Module:
    """SwiGLU (Llama) or the biased GELU MLP d -> r·d -> d, N(0, 0.02²) weights (GPT)."""
    if spec.gpt:
        return layers.MLP(spec.d_model, spec.mlp_ratio, reference=False, dtype=spec.dtype, name="mlp")
    return layers.SwiGLU(spec.d_model, spec.mlp_width, spec.dtype, name="mlp")


class TransformerBlock(nn.Module):
    """x += Attn(RMSNorm x); x += SwiGLU(RMSNorm x); ``block(x_BxD, pos, cache)``: the step form.

    Ablations (docs/ablations.md): ``layer_norm=False`` drops both norms (x += Attn(x); x += MLP(x)),
    ``residual=False`` both residual additions (x <- Attn(N x); x <- MLP(N x)), ``mlp='none'`` the
    MLP and its norm (x += Attn(N x)), ``mlp='attention'`` puts a second attention ``mlp_attn`` (its
    own q, k, v, o and, in the step form, its own KV cache ``cache['mlp']``) in the MLP's place.

    Hybrids (docs/transformer_baseline.md#hybrids): ``hybrid='series'`` (the transfixer) adds
    x += Mix(N' x) (norm ``mix_norm``, mixing ``mix``) between attention and MLP; ``'parallel'``
    makes the first sublayer x += Attn(N x) + Mix(N x) (one norm). The mixing is a
    :class:`TokenMixing` (flat by default); in the step form it keeps its inputs in ``cache['mix']``.
    """

    spec: TransformerSpec

    @nn.nowrap
    def _mixing(self, **kw) -> TokenMixing:
        return TokenMixing(self.spec.token_mixing, **kw, name="mix")

    def _token_mix(self, h: Array, pos: Array | None, cache: dict | None) -> tuple[Array, dict | None]:
        """The hybrid's token mixing of the normed h: the step form with ``cache['mix']``, or the
        parallel form over n ≤ n_ctx positions (zero-padded to n_ctx, which a causal mixing
        never reads back into the first n outputs, then cut)."""
        if cache is not None:
            return self._mixing()(h, pos, cache["mix"])
        n, n_ctx = h.shape[1], self.spec.n_ctx
        padded = jnp.pad(h, ((0, 0), (0, n_ctx - n), (0, 0))) if n < n_ctx else h
        y = self._mixing()(padded)[:, :n]
        return layers.dropout(self, y, self.spec.dropout_resid), None

    @nn.compact
    def __call__(self, x_BxNxD: Array, pos: Array | None = None, cache: dict | None = None,
                 positions_BxN: Array | None = None, mask_Bx1xNxN: Array | None = None):
        step = cache is not None
        names = ("batch", "length", "act_embed")
        spec = self.spec

        def normed(x, name):
            return norm(spec, name)(x) if spec.layer_norm else x

        def add(x, h):
            return x + h if spec.residual else h

        def attend(h, name, layer_cache):
            attn = Attention(spec, name=name)
            if step:
                return attn(h, pos, layer_cache)
            h = attn(h, positions_BxN=positions_BxN, mask_Bx1xNxN=mask_Bx1xNxN)
            return layers.dropout(self, h, spec.dropout_resid), None

        if spec.hybrid != "none" and not step and (positions_BxN is not None
                                                   or mask_Bx1xNxN is not None):
            raise ValueError("a transformer-mixer hybrid takes no explicit positions or attention "
                             "mask (its token mixing has fixed positions 0..n_ctx-1)")
        h_in = normed(x_BxNxD, "attn_norm")
        h, new_cache = attend(h_in, "attn", cache)
        if spec.hybrid == "parallel":  # x += Attn(N x) + Mix(N x)
            h_mix, mix_cache = self._token_mix(h_in, pos, cache)
            h = h + h_mix
        x_BxNxD = add(x_BxNxD, h) if step else nn.with_logical_constraint(add(x_BxNxD, h), names)
        if spec.hybrid == "series":  # the transfixer: x += Mix(N' x) after attention
            h, mix_cache = self._token_mix(normed(x_BxNxD, "mix_norm"), pos, cache)
            x_BxNxD = add(x_BxNxD, h) if step else nn.with_logical_constraint(add(x_BxNxD, h), names)
        if step and spec.hybrid != "none":
            new_cache = dict(new_cache, mix=mix_cache)
        if spec.mlp == "none":
            return (x_BxNxD, new_cache) if step else x_BxNxD
        h = normed(x_BxNxD, "mlp_norm")
        if spec.mlp == "attention":
            h, mlp_cache = attend(h, "mlp_attn", cache["mlp"] if step else None)
            if step:
                new_cache = dict(new_cache, mlp=mlp_cache)
        else:
            h = mlp(spec)(h)
            h = layers.dropout(self, h, spec.dropout_resid)
        if step:
            return add(x_BxNxD, h), new_cache
        return nn.with_logical_constraint(add(x_BxNxD, h), names)


class TransformerLM(nn.Module):
    """Llama-style causal LM: tokens [B, n ≤ n_ctx] int32 -> logits [B, n, V] float32; all
    hyper-parameters in ``spec`` (:class:`~mixers_jax.models.specs.TransformerSpec`)."""

    spec: TransformerSpec

    @property
    def n_ctx(self) -> int:
        return self.spec.n_ctx

    def setup(self):
        spec = self.spec
        self.embed = layers.Embed(spec.vocab_size, spec.d_model, layers.normal(spec.embed_std),
                                  spec.dtype)
        block = layers.rematerialized(TransformerBlock, spec.remat)
        if spec.scan_layers:  # one block, parameters stacked along 'layers' (blocks/...)
            self.blocks = block(spec, name="blocks")
        else:
            self.blocks = tuple(block(spec, name=f"block_{i}") for i in range(spec.n_layers))
        if spec.layer_norm:
            self.final_norm = norm(spec)
        if spec.gpt:
            self.pos_embed = layers.Embed(spec.n_ctx, spec.d_model, layers.normal(0.02), spec.dtype)
        if not spec.tie_embeddings:
            self.head = layers.lm_head(spec.vocab_size, layers.normal(0.02), spec.dtype)

    def embed_tokens(self, tokens_BxN: Array) -> Array:
        if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] > self.n_ctx:
            raise UserError(
                f"the transformer takes at most n_ctx={self.n_ctx} tokens per row; got input of "
                f"shape {tuple(tokens_BxN.shape)}"
            )
        x_BxNxD = layers.dropout(self, self.embed(tokens_BxN), self.spec.dropout_embed)
        return nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))

    def hidden(self, x_BxNxD: Array, positions_BxN: Array | None = None,
               mask_Bx1xNxN: Array | None = None) -> Array:
        """Block outputs followed by the final RMSNorm (none with ``layer_norm=False``). Optional
        RoPE ``positions_BxN`` (default 0..n−1) and boolean attention mask (default causal; a given
        mask must include causality). GPT: first adds the learned position embeddings at those
        positions."""
        x_BxNxD = self.blocks_output(x_BxNxD, self.spec.n_layers, positions_BxN, mask_Bx1xNxN)
        return self.normalize(x_BxNxD)

    def blocks_output(self, x_BxNxD: Array, depth: int, positions_BxN: Array | None = None,
                      mask_Bx1xNxN: Array | None = None) -> Array:
        """Output of the first ``depth`` blocks (0 ≤ depth ≤ n_layers) on input embeddings x,
        before the final norm (GPT: positions added first); ``hidden`` = normalize(blocks_output(x,
        n_layers)). The input-inversion probe reads the shallower ones."""
        if self.spec.gpt:
            x_BxNxD = self.add_positions(x_BxNxD, positions_BxN)
        depth = layers.checked_depth(depth, self.spec.n_layers)
        if self.spec.scan_layers:
            return layers.scan_depth(self.blocks, self.spec.n_layers, depth, x_BxNxD,
                                     positions_BxN=positions_BxN, mask_Bx1xNxN=mask_Bx1xNxN)
        for block in self.blocks[:depth]:
            x_BxNxD = layers.call_block(self, block, x_BxNxD, None, None, positions_BxN,
                                        mask_Bx1xNxN, policy=self.spec.remat)
        return x_BxNxD

    def normalize(self, x: Array) -> Array:
        """The final norm (identity in the norm-free ablation)."""
        return self.final_norm(x) if self.spec.layer_norm else x

    def add_positions(self, x: Array, positions: Array | None) -> Array:
        """x [B, N, d] (or [B, d]) + GPT's learned position embeddings at ``positions`` [B, N]
        (or a scalar; None: 0..N−1)."""
        p = self.pos_embed(jnp.arange(x.shape[1]) if positions is None else positions)
        return x + layers.leading_axes(p, x.ndim)

    def logits(self, h_BxNxD: Array) -> Array:
        return self.embed.attend(h_BxNxD) if self.spec.tie_embeddings else self.head(h_BxNxD)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.logits(self.hidden(self.embed_tokens(tokens_BxN)))

    def final_hidden(self, tokens_BxN: Array, keep_BxN: Array | None = None) -> Array:
        """The final-norm output [B, n, d] (what the LM head reads). With ``keep_BxN`` (1 = real
        token, 0 = pad) pads are left out: no position attends to a pad key (a pad query attends
        to itself only), and positions (RoPE, or GPT's learned table) count the real tokens before
        each token, p_i = Σ_{j<i} keep_j. A real token's hidden state then equals the unpadded
        row's at the same token, whether the pads are on the left or the right
        (docs/retrieval.md#padding-and-the-embedding-position)."""
        x_BxNxD = self.embed_tokens(tokens_BxN)
        if keep_BxN is None:
            return self.hidden(x_BxNxD)
        keep_BxN = keep_BxN.astype(bool)
        n = tokens_BxN.shape[1]
        positions_BxN = jnp.maximum(jnp.cumsum(keep_BxN.astype(jnp.int32), axis=1) - 1, 0)
        eye_NxN = jnp.eye(n, dtype=bool)
        allowed_NxN = jnp.tril(jnp.ones((n, n), bool)) if self.spec.causal else jnp.ones((n, n), bool)
        mask_BxNxN = allowed_NxN[None] & (keep_BxN[:, None, :] | eye_NxN[None])
        return self.hidden(x_BxNxD, positions_BxN, mask_BxNxN[:, None])

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> tuple:
        """KV cache per layer: k, v [B, H, n_ctx, hd] in the compute dtype (and the same under
        ``mlp`` for ``mlp='attention'``)."""
        spec = self.spec
        if not spec.causal:
            raise UserError(
                "a bidirectional (model.causal=False) transformer has no step form (generation / "
                "compression need causal attention)"
            )
        if mode != "cached":
            raise ValueError(f"the transformer has only the 'cached' (KV cache) step, not {mode!r}")
        # (a hybrid's token mixing keeps its inputs, 'cached', under 'mix')
        shape = (batch, spec.kv_heads, spec.n_ctx, spec.head_width)

        def kv() -> dict:
            return {"k": jnp.zeros(shape, spec.dtype), "v": jnp.zeros(shape, spec.dtype)}

        def layer_cache() -> dict:
            cache = dict(kv(), mlp=kv()) if spec.mlp == "attention" else kv()
            if spec.hybrid != "none":
                cache["mix"] = TokenMixing(spec.token_mixing, parent=None).init_cache(batch, mode)
            return cache

        caches = tuple(layer_cache() for _ in range(spec.n_layers))
        return layers.stack_layer_caches(caches) if spec.scan_layers else caches

    def step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """Token [B] at position ``pos`` (scalar) -> (logits [B, V] float32, new KV cache)."""
        if not self.spec.causal:
            raise UserError("a bidirectional (model.causal=False) transformer has no step form")
        return self.step_embedded(self.embed(tokens_B), pos, cache)

    def step_embedded(self, x_BxD: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """:meth:`step` on an input embedding x [B, d] instead of a token (memory slots)."""
        if self.spec.gpt:
            x_BxD = self.add_positions(x_BxD, jnp.asarray(pos, jnp.int32))
        if self.spec.scan_layers:
            x, cache = layers.scan_blocks_step(self.blocks, self.spec.n_layers, x_BxD, pos, cache)
        else:
            x, cache = layers.run_blocks_step(self.blocks, x_BxD, pos, cache)
        return self.logits(self.normalize(x)), cache

    @property
    def slides(self) -> bool:
        """Whether :meth:`slide_step` is defined: causal attention with RoPE (not GPT's table), no
        hybrid token mixing."""
        return (self.spec.causal and not self.spec.gpt and not self.spec.scan_layers
                and self.spec.hybrid == "none")  # a hybrid's mixing has positions < n_ctx only

    def slide_step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """The step at a position ``pos`` ≥ n_ctx of a longer stream: :meth:`step` itself, whose
        ring cache then holds the last n_ctx positions (module doc). Only for :attr:`slides`."""
        if not self.slides:
            raise UserError("a GPT transformer (learned positions up to n_ctx), a hybrid "
                            "(model.hybrid) or one with scanned blocks (model.scan_layers) has no "
                            "sliding step")
        return self.step(tokens_B, pos, cache)
