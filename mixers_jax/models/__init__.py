"""Model registry: ``build_model(config.model) -> flax.linen.Module``.

Every model maps tokens [B, n] int32 to logits [B, n, V] float32:
``model.init(rng, tokens)``, ``model.apply({'params': params}, tokens)``.
Params are float32; compute runs in ``model_cfg.dtype``. Kinds: 'mixer' (REFERENCE §2; n must equal
n_ctx; with ``mixing`` row/col/mixed and ``block='srm'`` the structured recurrent mixer of §8),
'transformer' (REFERENCE §3; n ≤ n_ctx), and the chunked memory models 'memory' and 'rmt'
(REFERENCE §6; rows of n = chunks·n_ctx tokens, see ``models/memory.py``). Bad combinations raise
``UserError``.

Step forms (generation, compression): ``cache = model.init_cache(batch, mode)`` with mode 'cached'
(every model: mixing-input caches, KV cache) or 'recurrent' (structured mixing: O(d) state per layer),
then ``logits_BxV, cache = model.apply({'params': p}, tokens_B, pos, cache, method='step')`` for
pos = 0, 1, ...; the logits equal the parallel forward's at that position.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.autoencoder import EXPANSIONS, INJECTIONS, Autoencoder, EmbeddingCLM
from mixers_jax.models.bottleneck import QUANTS
from mixers_jax.models.memory import MemoryLM, RecurrentMemoryLM
from mixers_jax.models.mixer import MaskedMixerLM, MixerBlock
from mixers_jax.models.mixing import IMPLS, MASK_GRADS, MIXINGS, SRM_MIXINGS, TokenMixing
from mixers_jax.models.transformer import TransformerLM

__all__ = [
    "build_model",
    "input_length",
    "register",
    "sub_config",
    "MODEL_KINDS",
    "Autoencoder",
    "EmbeddingCLM",
    "MaskedMixerLM",
    "MemoryLM",
    "MixerBlock",
    "RecurrentMemoryLM",
    "TokenMixing",
    "TransformerLM",
]

DTYPES = ("float32", "bfloat16")
BLOCKS = ("mixer", "srm")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        return cfg[key]
    except (KeyError, AttributeError, TypeError):
        return getattr(cfg, key, default)


def _check_common(cfg: Any) -> None:
    for key in ("vocab_size", "n_ctx", "d_model", "n_layers", "mlp_ratio"):
        value = _get(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"model.{key} must be a positive integer, got {value!r}")
    if _get(cfg, "dtype") not in DTYPES:
        raise UserError(f"model.dtype must be one of {DTYPES}, got {_get(cfg, 'dtype')!r}")


def _build_mixer(cfg: Any) -> nn.Module:
    _check_common(cfg)
    mixing, impl, mask_grad = _get(cfg, "mixing"), _get(cfg, "mixing_impl"), _get(cfg, "mask_grad")
    heads, d = _get(cfg, "heads"), _get(cfg, "d_model")
    if mixing not in MIXINGS:
        raise UserError(f"model.mixing must be one of {MIXINGS}, got {mixing!r}")
    if impl not in IMPLS:
        raise UserError(f"model.mixing_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "fft" and mixing != "toeplitz":
        raise UserError(f"model.mixing_impl='fft' needs model.mixing='toeplitz' (got {mixing!r})")
    if mask_grad not in MASK_GRADS:
        raise UserError(f"model.mask_grad must be one of {MASK_GRADS}, got {mask_grad!r}")
    if mask_grad == "straight_through" and mixing != "flat":
        raise UserError(
            "model.mask_grad='straight_through' applies to flat mixing only (a Toeplitz matrix has "
            "no upper-triangle parameters); use mask_grad='masked'"
        )
    if not isinstance(heads, int) or heads < 0:
        raise UserError(f"model.heads must be an integer >= 0, got {heads!r}")
    block = _get(cfg, "block", "mixer")
    if block not in BLOCKS:
        raise UserError(f"model.block must be one of {BLOCKS}, got {block!r}")
    if mixing in SRM_MIXINGS and impl != "dense":
        raise UserError(f"model.mixing={mixing!r} has only mixing_impl='dense' (got {impl!r})")
    if mixing == "mixed" and heads < 2:
        raise UserError("model.mixing='mixed' needs model.heads >= 2 (half column-, half row-repeat)")
    if heads and d % heads:
        raise UserError(f"model.d_model={d} must be divisible by model.heads={heads}")
    kernel, causal = _get(cfg, "kernel", 1), _get(cfg, "causal", True)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise UserError(f"model.kernel must be an integer >= 1, got {kernel!r}")
    if kernel > 1 and mixing != "flat":
        raise UserError(
            f"model.kernel={kernel} (kernel mixing, §2.1) needs model.mixing='flat', got {mixing!r}")
    if not causal and mixing in SRM_MIXINGS:
        raise UserError(
            f"model.mixing={mixing!r} is causal only; model.causal=False needs flat or toeplitz")
    if not causal and mask_grad == "straight_through":
        raise UserError(
            "model.mask_grad='straight_through' needs causal mixing (causal=False has no mask)")
    return MaskedMixerLM(
        vocab_size=_get(cfg, "vocab_size"),
        n_ctx=_get(cfg, "n_ctx"),
        d_model=d,
        n_layers=_get(cfg, "n_layers"),
        mlp_ratio=_get(cfg, "mlp_ratio"),
        mixing=mixing,
        heads=heads,
        impl=impl,
        expanded=bool(_get(cfg, "expanded")),
        mask_grad=mask_grad,
        reference=bool(_get(cfg, "reference")),
        layer_norm=bool(_get(cfg, "layer_norm")),
        residual=bool(_get(cfg, "residual")),
        tie_embeddings=bool(_get(cfg, "tie_embeddings")),
        block=block,
        decay=bool(_get(cfg, "decay", True)),
        kernel=kernel,
        causal=bool(causal),
        dtype=layers.dtype_of(_get(cfg, "dtype")),
    )


def _build_transformer(cfg: Any) -> nn.Module:
    _check_common(cfg)
    d, h = _get(cfg, "d_model"), _get(cfg, "n_heads")
    if not isinstance(h, int) or h < 1:
        raise UserError(f"model.n_heads must be a positive integer, got {h!r}")
    if d % h:
        raise UserError(f"model.d_model={d} must be divisible by model.n_heads={h}")
    if (d // h) % 2:
        raise UserError(f"RoPE needs an even head width; d_model/n_heads = {d // h}")
    kernel = _get(cfg, "kernel", 1)
    if kernel != 1:
        raise UserError(
            f"model.kernel={kernel!r}: kernel mixing is a mixer option; a transformer needs kernel=1")
    return TransformerLM(
        vocab_size=_get(cfg, "vocab_size"),
        n_ctx=_get(cfg, "n_ctx"),
        d_model=d,
        n_layers=_get(cfg, "n_layers"),
        n_heads=h,
        mlp_ratio=_get(cfg, "mlp_ratio"),
        rope_theta=float(_get(cfg, "rope_theta")),
        tie_embeddings=bool(_get(cfg, "tie_embeddings")),
        dtype=layers.dtype_of(_get(cfg, "dtype")),
        causal=bool(_get(cfg, "causal", True)),
    )


MODEL_KINDS: dict[str, Callable[[Any], nn.Module]] = {
    "mixer": _build_mixer,
    "transformer": _build_transformer,
}


COMPOSITE_FIELDS = ("d_model", "n_layers", "mixing", "heads", "kernel", "n_heads", "causal")
CHUNKED_KINDS = ("memory", "rmt")  # rows hold model.chunks chunks of n_ctx tokens


def _as_dict(cfg: Any) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def sub_config(model_cfg: Any, role: str, n_ctx: int | None = None) -> dict:
    """The flat config of a composite model's ``role`` ('encoder' | 'decoder') sub-model.

    Starts from the top-level model fields and overrides those that ``model.<role>`` sets
    (0 / '' / -1 mean "inherit"); ``kind`` comes from the role; ``n_ctx`` (the sub-model's mixing
    length, e.g. n_ctx + s for a memory decoder) defaults to the top-level one. The result is
    accepted by :func:`build_model`.
    """
    top = _as_dict(model_cfg)
    role_cfg = top.get(role) or {}
    out = {k: v for k, v in top.items() if not isinstance(v, dict)}
    out["kind"] = role_cfg.get("kind", "mixer")
    for key in COMPOSITE_FIELDS:
        value = role_cfg.get(key)
        inherit = value is None or value == "" or (key == "heads" and value == -1) or (
            key != "heads" and key != "causal" and value == 0)
        if not inherit:
            out[key] = value
    if n_ctx is not None:
        out["n_ctx"] = int(n_ctx)
    return out


def input_length(model_cfg: Any) -> int:
    """Tokens per data row: n_ctx, or chunks x n_ctx for the chunked memory models (§6)."""
    n = int(_get(model_cfg, "n_ctx"))
    if _get(model_cfg, "kind") in CHUNKED_KINDS:
        return n * int(_get(model_cfg, "chunks"))
    return n


SUB_KINDS = ("mixer", "transformer")  # what an encoder / decoder of a composite model may be
MEMORY_SLOTS = ("fixed", "variable")


def _positive_int(cfg: Any, key: str, minimum: int = 1) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"model.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _sub_model(model_cfg: Any, role: str, n_ctx: int) -> tuple[nn.Module, dict]:
    """Builds the ``role`` sub-model of length ``n_ctx``; its config errors name ``model.<role>``."""
    sub = sub_config(model_cfg, role, n_ctx=n_ctx)
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
    """Fill vector value: 0 for mixer decoders, 1 (all ones) for transformer decoders (§6)."""
    return 1.0 if sub["kind"] == "transformer" else 0.0


def _build_memory(cfg: Any) -> nn.Module:
    """Kind 'memory' (REFERENCE §6): encoder on chunks 0..s−2, bottleneck, decoder on all chunks."""
    s = _positive_int(cfg, "chunks", 2)
    n = _positive_int(cfg, "n_ctx")
    slots = _get(cfg, "memory_slots", "fixed")
    if slots not in MEMORY_SLOTS:
        raise UserError(f"model.memory_slots must be one of {MEMORY_SLOTS}, got {slots!r}")
    encoder, enc = _sub_model(cfg, "encoder", n)
    decoder, dec = _sub_model(cfg, "decoder", n + s)
    _causal_decoder(dec)
    if slots == "variable" and dec["kind"] != "transformer":
        raise UserError(
            "model.memory_slots='variable' needs a transformer decoder (a mixer's mixing matrices fix "
            "every position); use memory_slots='fixed' or model.decoder.kind='transformer'")
    c = _positive_int(cfg, "compression")
    d_enc, d_dec = int(enc["d_model"]), int(dec["d_model"])
    if d_enc % c:
        raise UserError(f"model.compression={c} must divide the encoder width {d_enc}")
    position = _get(_get(cfg, "encoder") or {}, "position", -1)
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise UserError(f"model.encoder.position must be an integer in [-{n}, {n - 1}], got {position!r}")
    quant = _get(cfg, "embed_quant", "none")
    if quant not in QUANTS:
        raise UserError(f"model.embed_quant must be one of {QUANTS}, got {quant!r}")
    qat = float(_get(cfg, "qat_noise", 0.0))
    if qat < 0:
        raise UserError(f"model.qat_noise must be >= 0, got {qat}")
    return MemoryLM(
        encoder=encoder, decoder=decoder, n_ctx=n, chunks=s, d_encoder=d_enc, d_decoder=d_dec,
        position=position, compression=c, quant=quant, qat_noise=qat, fill=_fill(dec),
        use_memory=bool(_get(cfg, "use_memory", True)), variable_slots=slots == "variable",
        reference=bool(_get(cfg, "reference", True)), dtype=layers.dtype_of(_get(cfg, "dtype")),
    )


def _build_rmt(cfg: Any) -> nn.Module:
    """Kind 'rmt' (REFERENCE §6 "Recurrent memory"): one decoder of length n + 1 and a carried state."""
    s = _positive_int(cfg, "chunks")
    n = _positive_int(cfg, "n_ctx")
    decoder, dec = _sub_model(cfg, "decoder", n + 1)
    _causal_decoder(dec)
    return RecurrentMemoryLM(
        decoder=decoder, n_ctx=n, chunks=s, d_model=int(dec["d_model"]), fill=_fill(dec),
        overwrite=bool(_get(cfg, "rmt_overwrite", True)), dtype=layers.dtype_of(_get(cfg, "dtype")),
    )


def register(kind: str, builder: Callable[[Any], nn.Module]) -> None:
    """Adds a model kind (later: 'autoencoder', 'memory', 'srm', ...)."""
    MODEL_KINDS[kind] = builder


register("memory", _build_memory)
register("rmt", _build_rmt)


def _embedding_fields(cfg: Any, d_enc: int, n: int) -> dict:
    """Checked encoder.position, compression, embed_quant, qat_noise of a single-embedding model."""
    c = _positive_int(cfg, "compression")
    if d_enc % c:
        raise UserError(f"model.compression={c} must divide the encoder width {d_enc}")
    position = _get(_get(cfg, "encoder") or {}, "position", -1)
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise UserError(
            f"model.encoder.position must be an integer in [-{n}, {n - 1}], got {position!r}")
    quant = _get(cfg, "embed_quant", "none")
    if quant not in QUANTS:
        raise UserError(f"model.embed_quant must be one of {QUANTS}, got {quant!r}")
    qat = float(_get(cfg, "qat_noise", 0.0))
    if qat < 0:
        raise UserError(f"model.qat_noise must be >= 0, got {qat}")
    return {"position": position, "compression": c, "quant": quant, "qat_noise": qat,
            "reference": bool(_get(cfg, "reference", True)),
            "dtype": layers.dtype_of(_get(cfg, "dtype"))}


def _build_autoencoder(cfg: Any) -> nn.Module:
    """Kind 'autoencoder' (REFERENCE §4): encoder -> one embedding -> repeat / unroll -> decoder."""
    n = _positive_int(cfg, "n_ctx")
    encoder, enc = _sub_model(cfg, "encoder", n)
    decoder, dec = _sub_model(cfg, "decoder", n)
    d_enc, d_dec = int(enc["d_model"]), int(dec["d_model"])
    expansion = _get(cfg, "expansion", "repeat")
    if expansion not in EXPANSIONS:
        raise UserError(f"model.expansion must be one of {EXPANSIONS}, got {expansion!r}")
    if expansion == "unroll" and d_dec % 2:
        raise UserError(
            f"model.expansion='unroll' needs an even decoder width (windows of d/2), got {d_dec}")
    return Autoencoder(encoder=encoder, decoder=decoder, n_ctx=n, d_encoder=d_enc, d_decoder=d_dec,
                       expansion=expansion, **_embedding_fields(cfg, d_enc, n))


def _build_embedding_clm(cfg: Any) -> nn.Module:
    """Kind 'embedding_clm' (REFERENCE §5): oracle encoder embedding injected into a causal decoder."""
    n = _positive_int(cfg, "n_ctx")
    injection = _get(cfg, "injection", "token")
    if injection not in INJECTIONS:
        raise UserError(f"model.injection must be one of {INJECTIONS}, got {injection!r}")
    encoder, enc = _sub_model(cfg, "encoder", n)
    d_enc = int(enc["d_model"])
    fields = _embedding_fields(cfg, d_enc, n)
    d_dec = int(sub_config(cfg, "decoder")["d_model"])
    dec_cfg = cfg
    if injection == "embedding":  # blocks and head run at d_dec + d_enc/c (§5)
        dec_cfg = _as_dict(cfg)
        width = d_dec + d_enc // fields["compression"]
        dec_cfg["decoder"] = dict(dec_cfg.get("decoder") or {}, d_model=width)
    decoder, dec = _sub_model(dec_cfg, "decoder", n + 1 if injection == "token" else n)
    if not dec.get("causal", True):
        raise UserError(
            "model.decoder.causal must be True: the embedding_clm decoder predicts the next token")
    mixer_not_ref = dec["kind"] == "mixer" and not fields["reference"]
    return EmbeddingCLM(encoder=encoder, decoder=decoder, n_ctx=n, vocab_size=int(dec["vocab_size"]),
                        d_encoder=d_enc, d_decoder=d_dec, injection=injection,
                        token_embed_std=0.02 if mixer_not_ref else 1.0, **fields)


register("autoencoder", _build_autoencoder)
register("embedding_clm", _build_embedding_clm)


def build_model(model_cfg: Any) -> nn.Module:
    """``config.model`` -> an un-initialised Flax module (tokens [B, n] -> fp32 logits [B, n, V])."""
    kind = _get(model_cfg, "kind")
    if kind not in MODEL_KINDS:
        raise UserError(f"unknown model.kind {kind!r}; choose one of: {', '.join(sorted(MODEL_KINDS))}")
    return MODEL_KINDS[kind](model_cfg)
