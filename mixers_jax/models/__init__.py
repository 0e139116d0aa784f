"""Model registry: ``build_model(config.model) -> flax.linen.Module``.

Every model maps tokens [B, n] int32 to logits [B, n, V] float32:
``model.init(rng, tokens)``, ``model.apply({'params': params}, tokens)``.
Params are float32; compute runs in ``model_cfg.dtype``. Kinds: 'mixer' (docs/masked_mixers.md; n must equal
n_ctx; with ``mixing`` row/col/mixed and ``block='srm'`` the structured recurrent mixer of
docs/recurrent_mixers.md),
'transformer' (docs/transformer_baseline.md; n ≤ n_ctx), and the chunked memory models 'memory' and 'rmt'
(docs/memory_models.md; rows of n = chunks·n_ctx tokens, see ``models/memory.py``). Bad combinations raise
``UserError``.

Step forms (generation, compression): ``cache = model.init_cache(batch, mode)`` with mode 'cached'
(every model: mixing-input caches, KV cache) or 'recurrent' (structured mixing: O(d) state per layer),
then ``logits_BxV, cache = model.apply({'params': p}, tokens_B, pos, cache, method='step')`` for
pos = 0, 1, ...; the logits equal the parallel forward's at that position. Models whose ``slides``
is true (Toeplitz and structured recurrent mixers, RoPE transformers) continue past n_ctx with
``method='slide_step'`` (mode 'cached'): each step then sees the last n_ctx positions.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.config import cfg_to_dict, field, input_length, sub_model_config
from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.autoencoder import EXPANSIONS, INJECTIONS, Autoencoder, EmbeddingCLM
from mixers_jax.models.bidirectional import BidirectionalMixerLM
from mixers_jax.models.bottleneck import QUANTS, EmbeddingSpec
from mixers_jax.models.matcher import EmbeddingMatcher
from mixers_jax.models.memory import MemoryLM, RecurrentMemoryLM
from mixers_jax.models.mixer import MaskedMixerLM, MixerBlock
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.specs import MixerSpec, TransformerSpec, mixer_spec, transformer_spec
from mixers_jax.models.transformer import TransformerLM

__all__ = [
    "build_model",
    "example_input",
    "register",
    "MODEL_KINDS",
    "Autoencoder",
    "BidirectionalMixerLM",
    "EmbeddingCLM",
    "EmbeddingMatcher",
    "MaskedMixerLM",
    "MemoryLM",
    "MixerBlock",
    "MixerSpec",
    "RecurrentMemoryLM",
    "TokenMixing",
    "TransformerLM",
    "TransformerSpec",
]


def _build_mixer(cfg: Any) -> nn.Module:
    spec = mixer_spec(cfg)
    return BidirectionalMixerLM(spec) if spec.bidirectional else MaskedMixerLM(spec)


def _build_transformer(cfg: Any) -> nn.Module:
    return TransformerLM(transformer_spec(cfg))


MODEL_KINDS: dict[str, Callable[[Any], nn.Module]] = {
    "mixer": _build_mixer,
    "transformer": _build_transformer,
}

SUB_KINDS = ("mixer", "transformer")  # what an encoder / decoder of a composite model may be
MEMORY_SLOTS = ("fixed", "variable")


def _positive_int(cfg: Any, key: str, minimum: int = 1) -> int:
    value = field(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"model.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _sub_model(model_cfg: Any, role: str, n_ctx: int) -> tuple[nn.Module, dict]:
    """Builds the ``role`` sub-model of length ``n_ctx``; its config errors name ``model.<role>``."""
    sub = sub_model_config(model_cfg, role, n_ctx=n_ctx)
    if sub["kind"] not in SUB_KINDS:
        raise UserError(f"model.{role}.kind must be one of {SUB_KINDS}, got {sub['kind']!r}")
    try:
        return MODEL_KINDS[sub["kind"]](sub), sub
    except UserError as e:
        raise UserError(f"model.{role} ({sub['kind']}, n_ctx={n_ctx}): {e}") from None


def _causal_decoder(sub: dict) -> None:
    if not sub.get("causal", True):
        raise UserError("model.decoder.causal must be True: a memory decoder predicts the next token")


def _fill(sub: dict) -> float:
    """Fill vector value: 0 for mixer decoders, 1 (all ones) for transformer decoders."""
    return 1.0 if sub["kind"] == "transformer" else 0.0


def _build_memory(cfg: Any) -> nn.Module:
    """Kind 'memory' (docs/memory_models.md): encoder on chunks 0..s−2, bottleneck, decoder on all chunks."""
    s = _positive_int(cfg, "chunks", 2)
    n = _positive_int(cfg, "n_ctx")
    slots = field(cfg, "memory_slots", "fixed")
    if slots not in MEMORY_SLOTS:
        raise UserError(f"model.memory_slots must be one of {MEMORY_SLOTS}, got {slots!r}")
    encoder, enc = _sub_model(cfg, "encoder", n)
    decoder, dec = _sub_model(cfg, "decoder", n + s)
    _causal_decoder(dec)
    if slots == "variable" and dec["kind"] != "transformer":
        raise UserError(
            "model.memory_slots='variable' needs a transformer decoder (a mixer's mixing matrices fix "
            "every position); use memory_slots='fixed' or model.decoder.kind='transformer'")
    d_enc, d_dec = int(enc["d_model"]), int(dec["d_model"])
    embedding = _embedding_spec(cfg, d_enc, n)
    return MemoryLM(
        encoder=encoder, decoder=decoder, n_ctx=n, chunks=s, d_encoder=d_enc, d_decoder=d_dec,
        fill=_fill(dec), use_memory=bool(field(cfg, "use_memory", True)),
        variable_slots=slots == "variable", embedding=embedding,
    )


def _build_rmt(cfg: Any) -> nn.Module:
    """Kind 'rmt' (docs/memory_models.md#recurrent-memory-baseline): one decoder of length n + 1 and a
    carried state."""
    s = _positive_int(cfg, "chunks")
    n = _positive_int(cfg, "n_ctx")
    decoder, dec = _sub_model(cfg, "decoder", n + 1)
    _causal_decoder(dec)
    return RecurrentMemoryLM(
        decoder=decoder, n_ctx=n, chunks=s, d_model=int(dec["d_model"]), fill=_fill(dec),
        overwrite=bool(field(cfg, "rmt_overwrite", True)), dtype=layers.dtype_of(field(cfg, "dtype")),
    )


def register(kind: str, builder: Callable[[Any], nn.Module]) -> None:
    """Adds a model kind (later: 'autoencoder', 'memory', 'srm', ...)."""
    MODEL_KINDS[kind] = builder


register("memory", _build_memory)
register("rmt", _build_rmt)


def _embedding_spec(cfg: Any, d_enc: int, n: int) -> EmbeddingSpec:
    """Checked encoder.position, compression, embed_quant, qat_noise of a single-embedding model."""
    c = _positive_int(cfg, "compression")
    if d_enc % c:
        raise UserError(f"model.compression={c} must divide the encoder width {d_enc}")
    position = field(field(cfg, "encoder") or {}, "position", -1)
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise UserError(
            f"model.encoder.position must be an integer in [-{n}, {n - 1}], got {position!r}")
    quant = field(cfg, "embed_quant", "none")
    if quant not in QUANTS:
        raise UserError(f"model.embed_quant must be one of {QUANTS}, got {quant!r}")
    qat = float(field(cfg, "qat_noise", 0.0))
    if qat < 0:
        raise UserError(f"model.qat_noise must be >= 0, got {qat}")
    return EmbeddingSpec(position=position, compression=c, quant=quant, qat_noise=qat,
                         reference=bool(field(cfg, "reference", True)),
                         dtype=layers.dtype_of(field(cfg, "dtype")))


def _build_autoencoder(cfg: Any) -> nn.Module:
    """Kind 'autoencoder' (docs/autoencoders.md): encoder -> one embedding -> repeat / unroll -> decoder."""
    n = _positive_int(cfg, "n_ctx")
    encoder, enc = _sub_model(cfg, "encoder", n)
    decoder, dec = _sub_model(cfg, "decoder", n)
    d_enc, d_dec = int(enc["d_model"]), int(dec["d_model"])
    expansion = field(cfg, "expansion", "repeat")
    if expansion not in EXPANSIONS:
        raise UserError(f"model.expansion must be one of {EXPANSIONS}, got {expansion!r}")
    if expansion == "unroll" and d_dec % 2:
        raise UserError(
            f"model.expansion='unroll' needs an even decoder width (windows of d/2), got {d_dec}")
    return Autoencoder(encoder=encoder, decoder=decoder, n_ctx=n, d_encoder=d_enc, d_decoder=d_dec,
                       expansion=expansion, embedding=_embedding_spec(cfg, d_enc, n))


def _build_embedding_clm(cfg: Any) -> nn.Module:
    """Kind 'embedding_clm' (docs/embedding_lms.md): oracle encoder embedding injected into a causal
    decoder."""
    n = _positive_int(cfg, "n_ctx")
    injection = field(cfg, "injection", "token")
    if injection not in INJECTIONS:
        raise UserError(f"model.injection must be one of {INJECTIONS}, got {injection!r}")
    encoder, enc = _sub_model(cfg, "encoder", n)
    d_enc = int(enc["d_model"])
    embedding = _embedding_spec(cfg, d_enc, n)
    d_dec = int(sub_model_config(cfg, "decoder")["d_model"])
    dec_cfg = cfg
    if injection == "embedding":  # blocks and head run at d_dec + d_enc/c (docs/embedding_lms.md)
        dec_cfg = cfg_to_dict(cfg)
        width = d_dec + d_enc // embedding.compression
        dec_cfg["decoder"] = dict(dec_cfg.get("decoder") or {}, d_model=width)
    decoder, dec = _sub_model(dec_cfg, "decoder", n + 1 if injection == "token" else n)
    if not dec.get("causal", True):
        raise UserError(
            "model.decoder.causal must be True: the embedding_clm decoder predicts the next token")
    mixer_not_ref = dec["kind"] == "mixer" and not embedding.reference
    return EmbeddingCLM(encoder=encoder, decoder=decoder, n_ctx=n, vocab_size=int(dec["vocab_size"]),
                        d_encoder=d_enc, d_decoder=d_dec, injection=injection,
                        token_embed_std=0.02 if mixer_not_ref else 1.0, embedding=embedding)


register("autoencoder", _build_autoencoder)
register("embedding_clm", _build_embedding_clm)


def _build_matcher(cfg: Any) -> nn.Module:
    """Kind 'matcher' (docs/search.md#direct-embedding-matching): an unmasked mixer over the
    embeddings of a query and n_ctx − 1 candidates, no token embedding, a Linear(d -> 1) score."""
    if field(cfg, "causal", True):
        raise UserError("model.kind='matcher' reads its whole pool at once: set model.causal=False "
                        "(unmasked mixing)")
    if _positive_int(cfg, "n_ctx") < 3:
        raise UserError("model.n_ctx of a matcher is the pool size + 1 (the query); it must be >= 3")
    return EmbeddingMatcher(mixer_spec(cfg))


register("matcher", _build_matcher)
EMBEDDING_INPUT_KINDS = ("matcher",)  # kinds that read float embeddings [B, n_ctx, d], not tokens


def example_input(model_cfg: Any) -> jax.Array:
    """One row of what the model reads (for ``init`` and shapes): int32 tokens [1, row length], or
    for kind 'matcher' float32 embeddings [1, n_ctx, d_model]."""
    if field(model_cfg, "kind") in EMBEDDING_INPUT_KINDS:
        return jnp.zeros((1, int(field(model_cfg, "n_ctx")), int(field(model_cfg, "d_model"))),
                         jnp.float32)
    return jnp.zeros((1, input_length(model_cfg)), jnp.int32)


def build_model(model_cfg: Any, remat: str = "none") -> nn.Module:
    """``config.model`` -> an un-initialised Flax module (tokens [B, n] -> fp32 logits [B, n, V]).

    ``remat`` (``train.remat``, one of ``layers.REMAT_POLICIES``) rematerialises every block of
    every (sub-)model in the backward pass; it changes neither the parameters nor the results."""
    kind = field(model_cfg, "kind")
    if kind not in MODEL_KINDS:
        raise UserError(f"unknown model.kind {kind!r}; choose one of: {', '.join(sorted(MODEL_KINDS))}")
    if remat != "none":  # read by the specs, inherited by every sub-model (sub_model_config)
        model_cfg = dict(cfg_to_dict(model_cfg), remat=remat)
    return MODEL_KINDS[kind](model_cfg)
