"""Direct embedding matching (docs/search.md#direct-embedding-matching): an unmasked mixer that reads
the embeddings of a query and K candidates and scores each candidate.

    x = [e(q), e(c_1), ..., e(c_K)]          [B, M, d], M = K + 1 = model.n_ctx
    h = Block_L(... Block_1(x))               unmasked (bidirectional) mixer blocks, no token embedding
    s_k = h_k · w + b,  k = 1..K              a Linear(d -> 1) head on each candidate position

The embeddings e(·) come from a frozen generative model; the matcher is trained with the
cross-entropy of the positive candidate's position among the K scores (objective ``match``).
Since the mixing matrices are M x M, a matcher reads pools of exactly M − 1 candidates.

Parameter tree (d = d_model, M = n_ctx): ``block_{i}/...`` exactly as a mixer block of
``models/mixer.py`` (unmasked: every entry of ``mix/w`` is used), ``score/kernel`` [d, 1],
``score/bias`` [1]. There is no ``embed`` and no LM head.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.mixer import MixerBlock
from mixers_jax.models.specs import MixerSpec

Array = jax.Array


class EmbeddingMatcher(nn.Module):
    """[query, candidates] embeddings [B, M, d] float -> candidate scores [B, M − 1] float32."""

    spec: MixerSpec

    def setup(self):
        spec = self.spec
        self.blocks = tuple(MixerBlock(spec, name=f"block_{i}") for i in range(spec.n_layers))
        kernel_init, bias_init = layers.linear_inits(spec.reference, spec.d_model, spec.srm)
        self.score = layers.Linear((1,), ("embed", None), kernel_init=kernel_init,
                                   bias_init=bias_init, dtype=spec.dtype, out_dtype=jnp.float32)

    def __call__(self, x_BxMxD: Array) -> Array:
        spec = self.spec
        if x_BxMxD.ndim != 3 or x_BxMxD.shape[1:] != (spec.n_ctx, spec.d_model):
            raise UserError(
                f"the matcher reads [batch, n_ctx={spec.n_ctx}, d_model={spec.d_model}] embeddings "
                f"(a query and {spec.n_ctx - 1} candidates); got shape {tuple(x_BxMxD.shape)}")
        h_BxMxD = nn.with_logical_constraint(x_BxMxD.astype(spec.dtype),
                                             ("batch", "length", "act_embed"))
        for block in self.blocks:
            h_BxMxD = block(h_BxMxD)
        scores_BxM = self.score(h_BxMxD)[..., 0]
        return scores_BxM[:, 1:].astype(jnp.float32)
