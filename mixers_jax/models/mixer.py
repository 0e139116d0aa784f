"""Masked mixer language model (docs/masked_mixers.md): embedding -> L mixer blocks -> LM head, no final norm.

Block (pre-norm, token mixing first; docs/masked_mixers.md#the-mixer-block):
    x <- x + Mix(LN1 x);   x <- x + FFN(LN2 x),   FFN(z) = GELU(z A + a) C + a'
``layer_norm=False`` drops both LNs, ``residual=False`` drops both residual additions (ablations).
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

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.layers import lm_head, run_blocks_step
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.specs import MixerSpec

Array = jax.Array


class MixerBlock(nn.Module):
    """block='mixer': x <- x + Mix(LN1 x); x <- x + FFN(LN2 x).
    block='srm':   x <- x + FFN(LN2 x); x <- x + Mix(LN1 x), FFN with SiLU, Kaiming init.

    ``block(x_BxNxD)`` is the parallel form; ``block(x_BxD, pos, cache)`` -> (x_BxD, cache) the step
    form at position ``pos`` (the FFN and norms are position-wise, so only the mixing has a cache).
    """

    spec: MixerSpec

    @nn.nowrap
    def _mixing(self, **kw) -> TokenMixing:
        return TokenMixing(self.spec.token_mixing, **kw, name="mix")

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> dict:
        return self._mixing(parent=None).init_cache(batch, mode)

    @nn.compact
    def __call__(self, x: Array, pos: Array | None = None, cache: dict | None = None):
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

        def mix_part(x, cache):
            h = norm(x, "ln_mix")
            if step:
                h, cache = self._mixing()(h, pos, cache)
            else:
                h = self._mixing()(h)
            return residual(x, h), cache

        def ffn_part(x):
            h = layers.MLP(spec.d_model, spec.mlp_ratio, spec.reference, spec.dtype,
                           activation="silu" if spec.srm else "gelu", kaiming=spec.srm,
                           name="ffn")(norm(x, "ln_ffn"))
            return residual(x, h)

        if spec.srm:
            x = ffn_part(x)
            x, cache = mix_part(x, cache)
        else:
            x, cache = mix_part(x, cache)
            x = ffn_part(x)
        return (x, cache) if step else x


class MaskedMixerLM(nn.Module):
    """Masked mixer LM: tokens [B, n_ctx] int32 -> logits [B, n_ctx, V] float32.

    Methods usable with ``model.apply(..., method=...)``: ``embed_tokens`` (tokens -> x),
    ``hidden`` (x -> last block output), ``logits`` (hidden -> fp32 logits), ``step`` (one token at
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
        emb_init = layers.normal(1.0) if (spec.reference or spec.srm) else layers.normal(0.02)
        self.embed = layers.Embed(spec.vocab_size, spec.d_model, emb_init, spec.dtype)
        block = layers.rematerialized(MixerBlock, spec.remat)
        self.blocks = tuple(block(spec, name=f"block_{i}") for i in range(spec.n_layers))
        if not spec.tie_embeddings:
            self.head = lm_head(spec.vocab_size, layers.linear_inits(spec.reference, spec.d_model,
                                                                     spec.srm)[0], spec.dtype)

    def embed_tokens(self, tokens_BxN: Array) -> Array:
        if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] != self.n_ctx:
            raise UserError(
                f"a masked mixer takes exactly n_ctx={self.n_ctx} tokens per row (its mixing "
                f"matrices are n_ctx x n_ctx); got input of shape {tuple(tokens_BxN.shape)}; "
                "pad or truncate to n_ctx"
            )
        x_BxNxD = layers.dropout(self, self.embed(tokens_BxN), self.spec.dropout_embed)
        return nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))

    def hidden(self, x_BxNxD: Array) -> Array:
        for block in self.blocks:
            x_BxNxD = layers.call_block(self, block, x_BxNxD, policy=self.spec.remat)
        return x_BxNxD

    def logits(self, h_BxNxD: Array) -> Array:
        return self.embed.attend(h_BxNxD) if self.spec.tie_embeddings else self.head(h_BxNxD)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.logits(self.hidden(self.embed_tokens(tokens_BxN)))

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
        return tuple(proto.init_cache(batch, mode) for _ in range(self.spec.n_layers))

    def step(self, tokens_B: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
        """Token ``tokens_B`` [B] at position ``pos`` (scalar, 0 ≤ pos < n_ctx) -> (logits [B, V]
        float32 for the next token, new cache). Equals ``self(tokens)[:, pos]`` when the earlier
        positions were fed in order."""
        if not self.spec.causal:
            raise UserError("an unmasked (model.causal=False) mixer has no step form")
        x, cache = run_blocks_step(self.blocks, self.embed(tokens_B), pos, cache)
        return self.logits(x), cache
