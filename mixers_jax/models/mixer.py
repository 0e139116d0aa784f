"""Masked mixer language model (docs/masked_mixers.md): embedding -> L mixer blocks -> LM head, no final norm.

Block (pre-norm, token mixing first; docs/masked_mixers.md#the-mixer-block):
    x <- x + Mix(LN1 x);   x <- x + FFN(LN2 x),   FFN(z) = GELU(z A + a) C + a'
Ablations (docs/ablations.md): ``layer_norm=False`` drops both LNs (x <- x + Mix(x); x <- x + FFN(x)),
``residual=False`` both residual additions (x <- Mix(LN1 x); x <- FFN(LN2 x)), ``mlp='none'`` the
FFN with its LN (x <- x + Mix(LN1 x): ``ln_ffn`` and ``ffn`` leave the parameter tree).
No positional encoding: positions live in the rows of the mixing matrices, so the context length is
fixed at n_ctx and inputs must be exactly n_ctx tokens long.

Parameter tree (Flax paths; shapes for d = d_model, n = n_ctx, V = vocab, H = heads, F = mlp_ratio·d)
and the corresponding entries of the published PyTorch masked mixer's state dict:

    Flax path                          shape        PyTorch state-dict entry
    embed/embedding                    [V, d]       wte.weight                 [V, d]  (as is)
    block_{i}/ln_mix/scale, bias       [d]          mixerblocks.{i}.seq_layernorm.weight, .bias
    block_{i}/mix/w                    [n, n]       mixerblocks.{i}.conv.weight [n, n, 1] -> [:, :, 0]
    block_{i}/mix/c                    [n]          mixerblocks.{i}.conv.bias   [n]
    block_{i}/ln_ffn/scale, bias       [d]          mixerblocks.{i}.patch_layernorm.weight, .bias
    block_{i}/ffn/fc1/kernel, bias     [d, F], [F]  mixerblocks.{i}.patch_ff.0.weight [F, d] -> .T, .bias
    block_{i}/ffn/fc2/kernel, bias     [F, d], [d]  mixerblocks.{i}.patch_ff.2.weight [d, F] -> .T, .bias
    head/kernel                        [d, V]       lm_head.weight [V, d] -> .T   (absent if tied)

With ``model.scan_layers`` the blocks are one scanned module: ``blocks/...`` holds every
``block_{i}/...`` parameter stacked along a leading layer axis (``blocks/mix/w`` [L, n, n], ...).

The token-mixing "conv" is ``Conv1d(n, n, 1)`` applied with positions as channels: its weight is
[out_channels = output position i, in_channels = input position j, tap], which is exactly our
``w[i, j]``, so only the trailing tap axis is dropped, no transpose. PyTorch ``Linear.weight`` is
[out, in] while a Flax kernel is [in, out], so every linear is transposed.

Variants:
* expanded mixing (``ConvForward``, ``conv.0`` / ``conv.2``): ``mix/w1, c1`` <- ``conv.0.weight[:, :, 0],
  conv.0.bias``; ``mix/w2, c2`` <- ``conv.2``.
* headed mixing (per-head ``proj_head.{h}``, ``convs.{h}``, ``out_proj`` of the mixer head):
  ``mix/proj/kernel[:, h, :]`` <- ``proj_head.{h}.weight.T`` [d, d/H]; ``mix/proj/bias[h]`` <-
  ``proj_head.{h}.bias``; ``mix/w[h]`` <- ``convs.{h}.weight[:, :, 0]``; ``mix/c[h]`` <- ``convs.{h}.bias``;
  ``mix/out/kernel`` [H, d/H, d] <- ``out_proj.weight.T.reshape(H, d/H, d)`` (the concatenated
  features are head-major, feature h·d/H + k); ``mix/out/bias`` <- ``out_proj.bias``.
* Toeplitz mixing: ``mix/v`` [n] (v_0 weights the current token) and ``mix/c`` [n] (``v1, c1, v2, c2``
  when expanded; a leading [H] axis when headed).
* kernel mixing (k > 1, ``Conv1d(n, n, k)``): ``mix/w`` [n, n, k] <- ``conv.weight`` as is (all taps).

**Re-mask on load (docs/training.md#causal-mask-gradient).**
The reference trained with the straight-through mask and
overwrote its stored weights with the masked value only at the start of each forward, so its
checkpoints (and our own ``mask_grad='straight_through'`` parameters) hold non-zero, drifting entries
above the diagonal. They never affect our forward pass (the mask is applied functionally), but
importers and anything reading ``w`` directly must apply ``w = tril(w)`` (``mixing_math.mask_weight``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.layers import (checked_depth, lm_head, run_blocks_step, scan_blocks,
                                      scan_blocks_step, stack_layer_caches)
from mixers_jax.models.mixing import SRM_MIXINGS, TokenMixing
from mixers_jax.models.specs import MixerSpec

Array = jax.Array

# Mixings whose step form can slide past n_ctx (:meth:`MaskedMixerLM.slide_step`): every row of a
# Toeplitz matrix is the same kernel v_{i−j} cut at the diagonal, and a structured recurrent row
# weights the past by decays δ^(i−j); a flat matrix's rows are unrelated per-position weights.
SLIDING_MIXINGS = ("toeplitz",) + SRM_MIXINGS


class MixerBlock(nn.Module):
    """block='mixer': x <- x + Mix(LN1 x); x <- x + FFN(LN2 x).
    block='srm':   x <- x + FFN(LN2 x); x <- x + Mix(LN1 x), FFN with SiLU, Kaiming init.

    Block options (docs/masked_mixers.md#other-block-variants; defaults leave the block as above):
    ``parallel_mixers`` = P: Mix(LN1 x) becomes Σ_p Mix_p(LN1_p x), P token mixings with their own
    LayerNorm (``ln_mix``, ``ln_mix_1``, ...) and matrix (``mix``, ``mix_1``, ...);
    ``softmax_mixer``: the mixing output goes through a softmax over its d features before the
    residual add, x <- x + softmax_d(Mix(LN1 x)); ``position_channel``: before the block, the last
    feature of x is overwritten with the position i − ⌊n/2⌋ ∈ [−n/2, n/2).

    ``block(x_BxNxD)`` is the parallel form; ``block(x_BxD, pos, cache)`` -> (x_BxD, cache) the step
    form at position ``pos`` (the FFN and norms are position-wise, so only the mixing has a cache;
    P > 1: a tuple of the P mixings' caches).
    """

    spec: MixerSpec

    @nn.nowrap
    def _mixing(self, p: int = 0, **kw) -> TokenMixing:
        return TokenMixing(self.spec.token_mixing, **kw, name=numbered("mix", p))

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> dict | tuple:
        caches = tuple(self._mixing(p, parent=None).init_cache(batch, mode)
                       for p in range(self.spec.parallel_mixers))
        return caches[0] if len(caches) == 1 else caches

    @nn.compact
    def __call__(self, x: Array, pos: Array | None = None, cache: dict | None = None,
                 keep_BxN: Array | None = None):
        spec = self.spec
        step = cache is not None
        names = ("batch", "length", "act_embed")

        def constrain(y):
            return y if step else nn.with_logical_constraint(y, names)

        def norm(x, name):
            return layers.layer_norm(spec.dtype, name=name)(x) if spec.layer_norm else x

        def residual(x, h):
            h = layers.dropout(self, h, spec.dropout_resid)
            return constrain(x + h if spec.residual else h)

        def mix_one(x, p, cache):
            h = norm(x, numbered("ln_mix", p))
            if step:
                return self._mixing(p)(h, pos, cache)
            return self._mixing(p)(h, keep_BxN=keep_BxN), None

        def mix_part(x, cache):
            n_mix = spec.parallel_mixers
            caches = (cache,) if n_mix == 1 else (cache or (None,) * n_mix)
            h, new = None, []
            for p in range(n_mix):  # Σ_p Mix_p(LN1_p x)
                h_p, c_p = mix_one(x, p, caches[p])
                h = h_p if h is None else h + h_p
                new.append(c_p)
            if spec.softmax_mixer:  # softmax over the features of each position
                h = jax.nn.softmax(h.astype(jnp.float32), axis=-1).astype(h.dtype)
            return residual(x, h), (new[0] if n_mix == 1 else tuple(new))

        def ffn_part(x):
            h = layers.MLP(spec.d_model, spec.mlp_ratio, spec.reference, spec.dtype,
                           activation="silu" if spec.srm else "gelu", kaiming=spec.srm,
                           name="ffn")(norm(x, "ln_ffn"))
            return residual(x, h)

        if spec.position_channel:
            x = with_position_channel(x, spec.n_ctx, pos if step else None)
        has_ffn = spec.mlp != "none"
        if spec.srm:
            x = ffn_part(x) if has_ffn else x
            x, cache = mix_part(x, cache)
        else:
            x, cache = mix_part(x, cache)
            x = ffn_part(x) if has_ffn else x
        return (x, cache) if step else x


def numbered(name: str, p: int) -> str:
    """The module name of the p-th of a block's parallel mixings: ``name`` for p = 0 (the plain
    block's), ``name_p`` after it."""
    return name if p == 0 else f"{name}_{p}"


def channel_positions(n_ctx: int, positions: Array) -> Array:
    """The positional channel's value at ``positions``: i − ⌊n/2⌋, in [−n/2, n/2) for even n."""
    return positions - n_ctx // 2


def with_position_channel(x: Array, n_ctx: int, pos: Array | None = None) -> Array:
    """x [B, N, d] with feature d−1 of row i set to ``channel_positions(n_ctx, i)``; the step form
    x [B, d] at position ``pos`` gets ``channel_positions(n_ctx, pos)``."""
    if pos is not None:
        value = channel_positions(n_ctx, jnp.asarray(pos, jnp.int32)).astype(x.dtype)
        return x.at[:, -1].set(value)
    value_N = channel_positions(n_ctx, jnp.arange(x.shape[1], dtype=jnp.int32)).astype(x.dtype)
    return x.at[:, :, -1].set(jnp.broadcast_to(value_N, x.shape[:2]))


def check_row_length(tokens_BxN: Array, n_ctx: int) -> None:
    """``UserError`` unless ``tokens_BxN`` is [B, n_ctx]: a masked mixer's mixing matrices are
    n_ctx x n_ctx, so it reads rows of exactly that length."""
    if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] != n_ctx:
        raise UserError(
            f"a masked mixer takes exactly n_ctx={n_ctx} tokens per row (its mixing "
            f"matrices are n_ctx x n_ctx); got input of shape {tuple(tokens_BxN.shape)}; "
            "pad or truncate to n_ctx"
        )


def token_embedding(spec: MixerSpec) -> nn.Module:
    """The mixer's token embedding: N(0, 1) (reference or SRM) or N(0, 0.02²)."""
    emb_init = layers.normal(1.0) if (spec.reference or spec.srm) else layers.normal(0.02)
    return layers.Embed(spec.vocab_size, spec.d_model, emb_init, spec.dtype)


def untied_head(spec: MixerSpec) -> nn.Module:
    """The mixer's LM head d -> V (no bias), PyTorch-default, N(0, 0.02²) or Kaiming init."""
    return lm_head(spec.vocab_size, layers.linear_inits(spec.reference, spec.d_model, spec.srm)[0],
                   spec.dtype)


class MaskedMixerLM(nn.Module):
    """Masked mixer LM: tokens [B, n_ctx] int32 -> logits [B, n_ctx, V] float32.

    Methods usable with ``model.apply(..., method=...)``: ``embed_tokens`` (tokens -> x),
    ``hidden`` (x -> last block output), ``blocks_output`` (x, k -> output of the first k blocks),
    ``final_hidden`` (tokens, pad mask -> last block output, pads left out of the mixing),
    ``logits`` (hidden -> fp32 logits), ``step`` (one token at
    one position with a carried cache; ``model.init_cache(batch, mode)`` makes the cache).
    ``block='srm'`` with ``mixing`` in ('row', 'col', 'mixed') is the structured recurrent mixer
    (docs/recurrent_mixers.md): FFN-first SiLU blocks, Kaiming init, N(0, 1) embedding. ``kernel`` = k > 1 is
    the kernel mixer of docs/masked_mixers.md#kernel-mixing (``mix/w`` [n, n, k]);
    ``causal=False`` unmasked (bidirectional)
    mixing, e.g. for encoders (docs/autoencoders.md#encoder-and-decoder-choices).
    All hyper-parameters are in ``spec``
    (:class:`~mixers_jax.models.specs.MixerSpec`).
    """

    spec: MixerSpec

    @property
    def n_ctx(self) -> int:
        return self.spec.n_ctx

    def setup(self):
        spec = self.spec
        self.embed = token_embedding(spec)
        block = layers.rematerialized(MixerBlock, spec.remat)
        if spec.scan_layers:  # one block, parameters stacked along 'layers' (blocks/...)
            self.blocks = block(spec, name="blocks")
        else:
            self.blocks = tuple(block(spec, name=f"block_{i}") for i in range(spec.n_layers))
        if not spec.tie_embeddings:
            self.head = untied_head(spec)

    def embed_tokens(self, tokens_BxN: Array) -> Array:
        check_row_length(tokens_BxN, self.n_ctx)
        x_BxNxD = layers.dropout(self, self.embed(tokens_BxN), self.spec.dropout_embed)
        return nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))

    def hidden(self, x_BxNxD: Array) -> Array:
        return self.blocks_output(x_BxNxD, self.spec.n_layers)

    def blocks_output(self, x_BxNxD: Array, depth: int) -> Array:
        """Output of the first ``depth`` blocks (0 ≤ depth ≤ n_layers) on input embeddings x:
        ``hidden`` is ``blocks_output(x, n_layers)`` (the input-inversion probe reads the others).
        Scanned blocks (``scan_layers``) run all n_layers or none."""
        depth = checked_depth(depth, self.spec.n_layers)
        if self.spec.scan_layers:
            return layers.scan_depth(self.blocks, self.spec.n_layers, depth, x_BxNxD)
        for block in self.blocks[:depth]:
            x_BxNxD = layers.call_block(self, block, x_BxNxD, policy=self.spec.remat)
        return x_BxNxD

    def logits(self, h_BxNxD: Array) -> Array:
        return self.embed.attend(h_BxNxD) if self.spec.tie_embeddings else self.head(h_BxNxD)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.logits(self.hidden(self.embed_tokens(tokens_BxN)))

    def final_hidden(self, tokens_BxN: Array, keep_BxN: Array | None = None) -> Array:
        """The last block's output [B, n_ctx, d] (what the LM head reads), with the pad positions
        (``keep_BxN`` 0) left out of every token mixing: y_i = Σ_j W_ij·keep_j·z_j + c_i. Without
        ``keep_BxN`` it is ``hidden(embed_tokens(tokens))``. The mixing matrices are indexed by
        absolute position, so a left-padded row's hidden states depend on where it starts
        (docs/retrieval.md#padding-and-the-embedding-position)."""
        x_BxNxD = self.embed_tokens(tokens_BxN)
        if keep_BxN is None:
            return self.hidden(x_BxNxD)
        if self.spec.scan_layers:
            return scan_blocks(self.blocks, self.spec.n_layers, x_BxNxD, keep_BxN=keep_BxN)
        for block in self.blocks:
            x_BxNxD = block(x_BxNxD, keep_BxN=keep_BxN)
        return x_BxNxD

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> tuple:
        """Per-layer caches for :meth:`step`: 'cached' (mixing inputs, O(n·d) per layer) or
        'recurrent' (structured mixing only: O(d) per layer, independent of n). Unmasked
        (``causal=False``) models have no step form and raise ``UserError``."""
        if not self.spec.causal:
            raise UserError(
                "an unmasked (model.causal=False) mixer has no step form (generation / compression "
                "need causal mixing)"
            )
        proto = MixerBlock(self.spec, parent=None)
        caches = tuple(proto.init_cache(batch, mode) for _ in range(self.spec.n_layers))
        return stack_layer_caches(caches) if self.spec.scan_layers else caches

    def step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """Token ``tokens_B`` [B] at position ``pos`` (scalar, 0 ≤ pos < n_ctx) -> (logits [B, V]
        float32 for the next token, new cache). Equals ``self(tokens)[:, pos]`` when the earlier
        positions were fed in order."""
        if not self.spec.causal:
            raise UserError("an unmasked (model.causal=False) mixer has no step form")
        return self.step_embedded(self.embed(tokens_B), pos, cache)

    def step_embedded(self, x_BxD: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """:meth:`step` on an input embedding x [B, d] instead of a token (memory slots)."""
        if self.spec.scan_layers:
            x, cache = scan_blocks_step(self.blocks, self.spec.n_layers, x_BxD, pos, cache)
        else:
            x, cache = run_blocks_step(self.blocks, x_BxD, pos, cache)
        return self.logits(x), cache

    @property
    def slides(self) -> bool:
        """Whether :meth:`slide_step` is defined: causal single-tap mixing of SLIDING_MIXINGS, no
        positional channel (it holds absolute positions < n_ctx)."""
        mix = self.spec.token_mixing
        return (self.spec.causal and mix.kernel == 1 and mix.mixing in SLIDING_MIXINGS
                and not self.spec.scan_layers and not self.spec.position_channel)

    def slide_step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """The step at a position ``pos`` ≥ n_ctx of a longer stream (a cache of mode 'cached'
        filled by :meth:`step` at 0..n_ctx−1, then by this): every layer's cache drops its oldest
        input and the token enters at position n_ctx − 1, so each mixing output is row n_ctx − 1
        of its matrix (and bias c_{n−1}) over that layer's last n_ctx inputs — a sliding window.
        ``pos`` itself is not read. Only for :attr:`slides` models."""
        if not self.slides:
            raise UserError(f"{self.spec.token_mixing.mixing!r} mixing has no sliding step (only "
                            f"{SLIDING_MIXINGS} with kernel 1 and causal mixing, blocks not "
                            "scanned, no model.position_channel)")
        cache = jax.tree.map(lambda c: jnp.concatenate([c[:, 1:], jnp.zeros_like(c[:, :1])], axis=1),
                             cache)
        return self.step(tokens_B, jnp.int32(self.n_ctx - 1), cache)
