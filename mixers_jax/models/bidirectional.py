"""Bidirectional masked mixer LM (docs/masked_mixers.md#bidirectional-mixer).

Two residual streams run through every block, both starting from the token embedding x⁰:

    forward:  f ← f + Mix_f(LN_f f),  mixing masked to j ≤ i  (the plain causal flat mixer)
    reverse:  r ← r + Mix_r(LN_r r),  mixing masked to j ≥ i + 2
    then each stream s ∈ {f, r}: s ← s + FFN(LN_ffn s)  (one FFN and its norm, shared)

and the head reads head(f + r). Output i sees tokens ≤ i through f and i, ≥ i+2 through r, never
t_{i+1}, its target; the streams are never merged inside the blocks (a merge would carry t_{i+1}
from r at i−1 into f). The reverse mixing is a causal flat mixing in reversed, shifted coordinates:
r-mix(z) = flip(Mix(shift₂(flip z))) with shift₂(u)_k = u_{k−2} (zero for k < 2), i.e.
y_i = Σ_{j ≥ i+2} W_{n−1−i, n+1−j} z_j + c_{n−1−i}. Not causal: no step form.

Parameters: ``embed``, per block ``block_{i}/{ln_mix, mix}`` (forward), ``block_{i}/{ln_rev,
rev}`` (reverse, a flat ``w`` [n, n], ``c`` [n] each), ``block_{i}/{ln_ffn, ffn}`` (shared),
``head``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.mixer import check_row_length, token_embedding, untied_head
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.specs import MixerSpec

Array = jax.Array


def reverse_mix(mix: nn.Module, z_BxNxD: Array) -> Array:
    """y_i = Σ_{j ≥ i+2} (mixing in reversed coordinates) z_j: flip, shift by 2, causal mix, flip."""
    u = jnp.flip(z_BxNxD, axis=1)
    u = jnp.pad(u, ((0, 0), (2, 0), (0, 0)))[:, : z_BxNxD.shape[1]]
    return jnp.flip(mix(u), axis=1)


class BidirectionalBlock(nn.Module):
    """(f, r) -> (f + Mix_f(LN_f f), r + Mix_r(LN_r r)), then the shared FFN on each stream."""

    spec: MixerSpec

    @nn.compact
    def __call__(self, f_BxNxD: Array, r_BxNxD: Array) -> tuple[Array, Array]:
        spec = self.spec

        def ln(name):
            return layers.layer_norm(spec.dtype, name=name)

        f_BxNxD = f_BxNxD + TokenMixing(spec.token_mixing, name="mix")(ln("ln_mix")(f_BxNxD))
        r_BxNxD = r_BxNxD + reverse_mix(TokenMixing(spec.token_mixing, name="rev"),
                                        ln("ln_rev")(r_BxNxD))
        ffn_norm = ln("ln_ffn")
        ffn = layers.MLP(spec.d_model, spec.mlp_ratio, spec.reference, spec.dtype, name="ffn")
        return f_BxNxD + ffn(ffn_norm(f_BxNxD)), r_BxNxD + ffn(ffn_norm(r_BxNxD))


class BidirectionalMixerLM(nn.Module):
    """tokens [B, n_ctx] -> logits [B, n_ctx, V]; output i predicts t_{i+1} without seeing it."""

    spec: MixerSpec

    @property
    def n_ctx(self) -> int:
        return self.spec.n_ctx

    def setup(self):
        spec = self.spec
        self.embed = token_embedding(spec)
        self.blocks = tuple(BidirectionalBlock(spec, name=f"block_{i}") for i in range(spec.n_layers))
        self.head = untied_head(spec)

    def embed_tokens(self, tokens_BxN: Array) -> Array:
        check_row_length(tokens_BxN, self.n_ctx)
        return self.embed(tokens_BxN)

    def hidden(self, x_BxNxD: Array) -> Array:
        """f + r after the last block."""
        f_BxNxD = r_BxNxD = x_BxNxD
        for block in self.blocks:
            f_BxNxD, r_BxNxD = block(f_BxNxD, r_BxNxD)
        return f_BxNxD + r_BxNxD

    def logits(self, h_BxNxD: Array) -> Array:
        return self.head(h_BxNxD)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.logits(self.hidden(self.embed_tokens(tokens_BxN)))

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached"):
        raise UserError("a bidirectional mixer has no step form (its reverse stream reads later "
                        "tokens)")

    @property
    def slides(self) -> bool:
        return False
