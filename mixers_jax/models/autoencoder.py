"""One-pass autoencoders and embedding-augmented "oracle" causal LMs.

Both kinds run an **encoder** (a MaskedMixerLM or TransformerLM built from ``model.encoder`` by
``config.sub_model_config``) through ``embed_tokens`` + ``hidden`` only, so the encoder never creates
head parameters: its parameter tree is a causal LM's tree minus ``head`` and a trained CLM (or another
autoencoder's encoder) loads into it unchanged (``train.init_map='encoder=encoder'`` or
``'encoder=.'``). The single embedding is e = hidden[:, model.encoder.position] (−1; −2 for encoders
taken from causal LMs, whose last position is untrained). A transformer encoder's ``hidden`` ends
with its final RMSNorm: we run the full Llama stack with all configured layers, not the reference's
8-layer loop without a final norm (docs/transformer_baseline.md#transformer-encoders-and-decoders).

**'autoencoder'** (:class:`Autoencoder`, docs/autoencoders.md): tokens [B, n] -> encoder -> e [B, d_enc] ->
:class:`~mixers_jax.models.bottleneck.Bottleneck` (compress d_enc -> d_enc/c -> d_enc, quantize,
QAT noise, bridge d_enc -> d_dec when the widths differ) -> n decoder inputs X [B, n, d_dec]:

* ``expansion='repeat'``: X_i = e' for every i;
* ``expansion='unroll'`` (docs/autoencoders.md#unrolled-expansion): σ = i mod d,
  w_i = (e'_σ, e'_{σ+1}, …, e'_{σ+d/2−1}) with
  indices mod d (d = d_dec, even), X_i = w_i P + ρ with P [d/2, d] shared by all positions. Windows
  repeat cyclically when n > d. P exists only in unroll mode (the reference also creates it, unused,
  in repeat mode; we leave it out so that repeat models carry no dead parameters).

-> decoder (``model.decoder``) blocks on X (``hidden``; a mixer decoder has no token embedding, a
transformer decoder runs its blocks with RoPE positions 0..n−1 and its final norm) -> its head ->
logits [B, n, V]. Train with the ``autoencode`` objective (unshifted CE).

**'embedding_clm'** (:class:`EmbeddingCLM`, docs/embedding_lms.md): the encoder sees the whole row
(so it is an oracle:
the model is for entropy estimation and compression accounting, not generation); the decoder is a
causal LM with its own token embedding and head, and the embedding is injected by
``model.injection``:

* 'token': m = Bottleneck(e) (d_enc -> d_dec); X = [m; E t_0; …; E t_{n−1}] of length n+1 (a mixer
  decoder gets mixing length n+1). The returned logits are the decoder outputs 1..n, so logits[:, i]
  (output i+1, holding t_i) predicts t_{i+1} exactly as in a causal LM and the ``clm`` objective
  applies unchanged (outputs 1..n−1 predict t_1..t_{n−1}; the memory slot's output 0 and output n
  are unused, docs/embedding_lms.md#injection-modes).
* 'embedding': e' = quantize(e D + a_D) ∈ ℝ^{d_enc/c} (no up map), X_i = [e' ‖ E t_i].
  The token embedding E keeps the width ``model.decoder.d_model`` = d_dec and the decoder blocks and
  head run at d_dec + d_enc/c (docs/embedding_lms.md#embedding-injection). E is the top-level group
  ``token_embed`` [V, d_dec] (N(0, 1), the PyTorch default of stand-alone embeddings,
  docs/training.md#initialisation; N(0, 0.02²)
  for a mixer decoder with reference=False); the decoder's own embedding table is not created.
* 'add': X_i = E t_i + (e' W_p + b_p) with e' = Bottleneck(e) (d_enc -> d_enc) and W_p d_enc -> d_dec
  (group ``inject``, always present).

The decoder must be causal. Every output position i depends on the tokens ≤ i through the decoder and
on all tokens through the embedding.

Parameter groups: ``encoder`` (embed + blocks [+ final_norm]), ``bottleneck`` (down / up / bridge as
needed), ``expand`` (unroll), ``inject`` ('add'), ``token_embed`` ('embedding'), ``decoder`` (blocks
[+ final_norm] + head, and for 'token' / 'add' its embedding).

Both kinds: ``model.apply(v, tokens, method='embed')`` -> the stored vector z [B, d_enc/c] float32
(after the down map and the ``embed_quant`` cast; no noise) for probes and compression accounting;
``stored_width`` (and ``metrics.stored_numbers`` from a config) is d_enc/c, the numbers stored per row.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.bottleneck import Bottleneck, EmbeddingSpec, quantize

Array = jax.Array
Dtype = Any
ACT = ("batch", "length", "act_embed")

EXPANSIONS = ("repeat", "unroll")
INJECTIONS = ("token", "embedding", "add")


def unroll_indices(n: int, d: int) -> np.ndarray:
    """idx [n, d/2] with idx[i, m] = (i mod d + m) mod d: the cyclic window of position i."""
    i = np.arange(n)[:, None]
    m = np.arange(d // 2)[None, :]
    return ((i % d) + m) % d


def unroll_windows(e_BxD: Array, n: int) -> Array:
    """w [B, n, d/2]: w[b, i, m] = e[b, (i + m) mod d]."""
    return jnp.take(e_BxD, jnp.asarray(unroll_indices(n, e_BxD.shape[-1])), axis=-1)


class Compress(nn.Module):
    """z = quantize(e D + a_D) (+ U(−q, q) QAT noise with a 'noise' RNG): the stored half of
    :class:`Bottleneck` (the same parameter names, init and numerics), used where the compressed
    vector itself is injected ('embedding' injection, docs/embedding_lms.md#embedding-injection)."""

    d_in: int
    compression: int = 1
    quant: str = "none"
    qat_noise: float = 0.0
    reference: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e_BxD: Array) -> Array:
        c, d = int(self.compression), int(self.d_in)
        if c > 1:
            k_init, b_init = layers.linear_inits(self.reference, d)
            z = layers.Linear((d // c,), ("embed", None), kernel_init=k_init, bias_init=b_init,
                              dtype=self.dtype, gather_kernel=True, name="down")(e_BxD)
        else:
            z = e_BxD
        z = quantize(z, self.quant)
        if self.qat_noise > 0 and self.has_rng("noise"):
            u = jax.random.uniform(self.make_rng("noise"), z.shape, jnp.float32, -1.0, 1.0)
            z = z + (self.qat_noise * u).astype(z.dtype)
        return z


def _stored_vector(bottleneck: nn.Module, e_BxD: Array) -> Array:
    """The vector a :class:`Bottleneck` stores: the input of its 'up' (or 'bridge') map, else its
    output (c = 1, equal widths). Read by intercepting the bottleneck's own submodule calls."""
    if isinstance(bottleneck, Compress):
        return bottleneck(e_BxD)
    seen: list[Array] = []

    def grab(next_fun, args, kwargs, context):
        mod = context.module
        if (context.method_name == "__call__" and mod.name in ("up", "bridge") and not seen
                and mod.parent is not None and getattr(mod.parent, "name", None) == bottleneck.name):
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        out = bottleneck(e_BxD)
    return seen[0] if seen else out


class Unroll(nn.Module):
    """X_i = w_i P + ρ from the cyclic windows of e; P [d/2, d], ρ [d]."""

    n_ctx: int
    d_model: int
    reference: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e_BxD: Array) -> Array:
        half = self.d_model // 2
        k_init, b_init = layers.linear_inits(self.reference, half)
        proj = layers.Linear((self.d_model,), (None, "embed"), kernel_init=k_init, bias_init=b_init,
                             dtype=self.dtype, name="proj")
        return proj(unroll_windows(e_BxD.astype(self.dtype), self.n_ctx))


class _Encoded(nn.Module):
    """Shared encoder path: tokens -> e = encoder hidden state at ``position``."""

    def _check_tokens(self, tokens_BxN: Array) -> None:
        if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] != self.n_ctx:
            raise UserError(
                f"model.kind={self.kind_name!r} takes exactly n_ctx={self.n_ctx} tokens per row; got "
                f"input of shape {tuple(tokens_BxN.shape)}"
            )

    def encode(self, tokens_BxN: Array) -> Array:
        """e [B, d_enc]: the encoder's hidden state at ``position`` (compute dtype)."""
        self._check_tokens(tokens_BxN)
        h_BxNxD = self.encoder.hidden(self.encoder.embed_tokens(tokens_BxN))
        return h_BxNxD[:, self.embedding.position]

    def embed(self, tokens_BxN: Array) -> Array:
        """The stored vector z [B, d_enc/c] float32: after the down map and quantization."""
        return _stored_vector(self.bottleneck, self.encode(tokens_BxN)).astype(jnp.float32)

    @property
    def stored_width(self) -> int:
        """Numbers stored per row (d_enc / c), what the compression accounting counts."""
        return int(self.d_encoder) // int(self.embedding.compression)


class Autoencoder(_Encoded):
    """tokens [B, n] -> one embedding -> logits [B, n, V] reconstructing every token (docs/autoencoders.md).

    Methods (``model.apply(..., method=...)``): ``encode`` (tokens -> e), ``embed`` (tokens -> the
    stored z), ``decoder_inputs`` (tokens -> X [B, n, d_dec]), ``expand_embedding`` (e -> X),
    ``decode`` (X -> logits).
    """

    encoder: nn.Module
    decoder: nn.Module
    n_ctx: int
    d_encoder: int
    d_decoder: int
    embedding: EmbeddingSpec
    expansion: str = "repeat"
    kind_name = "autoencoder"

    def setup(self):
        self.bottleneck = Bottleneck(
            d_in=self.d_encoder, compression=self.embedding.compression, d_out=self.d_decoder,
            **self.embedding.bottleneck_fields(),
        )
        if self.expansion == "unroll":
            self.expand = Unroll(self.n_ctx, self.d_decoder, self.embedding.reference, self.embedding.dtype)

    def expand_embedding(self, e_BxD: Array) -> Array:
        """e [B, d_enc] -> bottleneck -> X [B, n, d_dec] (repeat or unroll)."""
        m_BxD = self.bottleneck(e_BxD).astype(self.embedding.dtype)
        if self.expansion == "unroll":
            x_BxNxD = self.expand(m_BxD)
        else:
            x_BxNxD = jnp.broadcast_to(m_BxD[:, None, :], (m_BxD.shape[0], self.n_ctx, m_BxD.shape[1]))
        return nn.with_logical_constraint(x_BxNxD, ACT)

    def decoder_inputs(self, tokens_BxN: Array) -> Array:
        return self.expand_embedding(self.encode(tokens_BxN))

    def decode(self, x_BxNxD: Array) -> Array:
        """Decoder blocks on X -> fp32 logits [B, n, V]."""
        return self.decoder.logits(self.decoder.hidden(x_BxNxD))

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.decode(self.decoder_inputs(tokens_BxN))


class EmbeddingCLM(_Encoded):
    """Oracle-embedding causal LM (docs/embedding_lms.md): tokens [B, n] -> logits [B, n, V], logits[:, i]
    predicting t_{i+1} (use the ``clm`` objective).

    Methods: ``encode``, ``embed`` (as :class:`Autoencoder`), ``memory`` (tokens -> the injected
    vector m: [B, d_dec] for 'token', [B, d_enc/c] for 'embedding', [B, d_dec] for 'add'), ``decode``
    (tokens, m -> logits; the decoder path with the embedding held fixed).
    """

    encoder: nn.Module
    decoder: nn.Module
    n_ctx: int
    vocab_size: int
    d_encoder: int
    d_decoder: int  # decoder token-embedding width (the blocks are wider for 'embedding')
    embedding: EmbeddingSpec
    injection: str = "token"
    token_embed_std: float = 1.0
    kind_name = "embedding_clm"

    def setup(self):
        kw = self.embedding.bottleneck_fields()
        if self.injection == "embedding":
            self.bottleneck = Compress(d_in=self.d_encoder, compression=self.embedding.compression, **kw)
            self.token_embed = layers.Embed(self.vocab_size, self.d_decoder,
                                            layers.normal(self.token_embed_std), self.embedding.dtype)
        elif self.injection == "add":
            self.bottleneck = Bottleneck(d_in=self.d_encoder, compression=self.embedding.compression, **kw)
            k_init, b_init = layers.linear_inits(self.embedding.reference, self.d_encoder)
            self.inject = layers.Linear((self.d_decoder,), ("embed", None), kernel_init=k_init,
                                        bias_init=b_init, dtype=self.embedding.dtype)
        else:
            self.bottleneck = Bottleneck(d_in=self.d_encoder, compression=self.embedding.compression,
                                         d_out=self.d_decoder, **kw)

    def memory(self, tokens_BxN: Array) -> Array:
        m = self.bottleneck(self.encode(tokens_BxN))
        if self.injection == "add":
            m = self.inject(m)
        return m.astype(self.embedding.dtype)

    def decode(self, tokens_BxN: Array, m_BxM: Array) -> Array:
        """Causal decoder on the tokens with the injected vector ``m_BxM`` -> logits [B, n, V]."""
        self._check_tokens(tokens_BxN)
        b, n = tokens_BxN.shape
        m_BxM = m_BxM.astype(self.embedding.dtype)
        if self.injection == "embedding":
            x = self.token_embed(tokens_BxN)
            x = jnp.concatenate([jnp.broadcast_to(m_BxM[:, None, :], (b, n, m_BxM.shape[-1])), x], -1)
        else:
            x = self.decoder.embed(tokens_BxN)
            if self.injection == "add":
                x = x + m_BxM[:, None, :]
            else:  # token: [m; E t_0 .. E t_{n-1}]
                x = jnp.concatenate([m_BxM[:, None, :], x], axis=1)
        h = self.decoder.hidden(nn.with_logical_constraint(x, ACT))
        if self.injection == "token":
            h = h[:, 1:]  # outputs 1..n: output i+1 holds t_i and predicts t_{i+1}
        return self.decoder.logits(h)

    def __call__(self, tokens_BxN: Array) -> Array:
        return self.decode(tokens_BxN, self.memory(tokens_BxN))
