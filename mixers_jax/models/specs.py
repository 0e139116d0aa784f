"""Model hyper-parameters, built once from ``config.model`` and validated there.

``mixer_spec(cfg)`` / ``transformer_spec(cfg)`` read a flat model config (a ConfigDict, or a dict
such as :func:`mixers_jax.config.sub_model_config` returns), check every field (bad values raise
``UserError`` naming ``model.<field>``) and return a frozen :class:`MixerSpec` /
:class:`TransformerSpec`. The Flax modules take the spec as their one hyper-parameter field and pass
it down unchanged, so no field is re-declared on the modules below.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mixers_jax.config import field
from mixers_jax.errors import UserError
from mixers_jax.models import layers
from mixers_jax.models.mixing import MixSetting, check_mixing

DTYPES = ("float32", "bfloat16")
BLOCKS = ("mixer", "srm")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """A masked mixer LM (REFERENCE §2, §8): see ``mixers_jax/config.py`` for each field."""

    vocab_size: int
    n_ctx: int
    d_model: int
    n_layers: int
    mlp_ratio: int = 4
    mixing: str = "flat"
    heads: int = 0
    impl: str = "dense"
    expanded: bool = False
    mask_grad: str = "masked"
    reference: bool = True
    layer_norm: bool = True
    residual: bool = True
    tie_embeddings: bool = False
    block: str = "mixer"
    decay: bool = True
    kernel: int = 1
    causal: bool = True
    dtype: Any = jnp.float32

    @property
    def srm(self) -> bool:
        """The SRM block (FFN first, SiLU, Kaiming init, N(0, 1) embedding; REFERENCE §8)."""
        return self.block == "srm"

    @property
    def mix_setting(self) -> MixSetting:
        return MixSetting(self.mixing, self.n_ctx, self.heads, self.kernel, self.causal, self.impl,
                          self.mask_grad, self.decay)

    def token_mixing_fields(self) -> dict:
        """The keyword fields of :class:`~mixers_jax.models.mixing.TokenMixing` for this model."""
        return dict(n_ctx=self.n_ctx, d_model=self.d_model, mixing=self.mixing, heads=self.heads,
                    impl=self.impl, expanded=self.expanded, mask_grad=self.mask_grad,
                    reference=self.reference, decay=self.decay, kaiming=self.srm,
                    kernel=self.kernel, causal=self.causal, dtype=self.dtype)


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """A Llama-style transformer (REFERENCE §3)."""

    vocab_size: int
    n_ctx: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    causal: bool = True  # False: bidirectional attention (encoders); no step form


def _check_common(cfg: Any) -> None:
    for key in ("vocab_size", "n_ctx", "d_model", "n_layers", "mlp_ratio"):
        value = field(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"model.{key} must be a positive integer, got {value!r}")
    if field(cfg, "dtype") not in DTYPES:
        raise UserError(f"model.dtype must be one of {DTYPES}, got {field(cfg, 'dtype')!r}")


def mixer_spec(cfg: Any) -> MixerSpec:
    """The checked :class:`MixerSpec` of a flat model config."""
    _check_common(cfg)
    mixing, impl, mask_grad = field(cfg, "mixing"), field(cfg, "mixing_impl"), field(cfg, "mask_grad")
    heads, d = field(cfg, "heads"), field(cfg, "d_model")
    kernel, causal = field(cfg, "kernel", 1), field(cfg, "causal", True)
    check_mixing(mixing, impl, mask_grad, heads, kernel, causal)
    block = field(cfg, "block", "mixer")
    if block not in BLOCKS:
        raise UserError(f"model.block must be one of {BLOCKS}, got {block!r}")
    if heads and d % heads:
        raise UserError(f"model.d_model={d} must be divisible by model.heads={heads}")
    return MixerSpec(
        vocab_size=field(cfg, "vocab_size"),
        n_ctx=field(cfg, "n_ctx"),
        d_model=d,
        n_layers=field(cfg, "n_layers"),
        mlp_ratio=field(cfg, "mlp_ratio"),
        mixing=mixing,
        heads=heads,
        impl=impl,
        expanded=bool(field(cfg, "expanded")),
        mask_grad=mask_grad,
        reference=bool(field(cfg, "reference")),
        layer_norm=bool(field(cfg, "layer_norm")),
        residual=bool(field(cfg, "residual")),
        tie_embeddings=bool(field(cfg, "tie_embeddings")),
        block=block,
        decay=bool(field(cfg, "decay", True)),
        kernel=kernel,
        causal=bool(causal),
        dtype=layers.dtype_of(field(cfg, "dtype")),
    )


def transformer_spec(cfg: Any) -> TransformerSpec:
    """The checked :class:`TransformerSpec` of a flat model config."""
    _check_common(cfg)
    d, h = field(cfg, "d_model"), field(cfg, "n_heads")
    if not isinstance(h, int) or h < 1:
        raise UserError(f"model.n_heads must be a positive integer, got {h!r}")
    if d % h:
        raise UserError(f"model.d_model={d} must be divisible by model.n_heads={h}")
    if (d // h) % 2:
        raise UserError(f"RoPE needs an even head width; d_model/n_heads = {d // h}")
    kernel = field(cfg, "kernel", 1)
    if kernel != 1:
        raise UserError(
            f"model.kernel={kernel!r}: kernel mixing is a mixer option; a transformer needs kernel=1")
    return TransformerSpec(
        vocab_size=field(cfg, "vocab_size"),
        n_ctx=field(cfg, "n_ctx"),
        d_model=d,
        n_layers=field(cfg, "n_layers"),
        n_heads=h,
        mlp_ratio=field(cfg, "mlp_ratio"),
        rope_theta=float(field(cfg, "rope_theta")),
        tie_embeddings=bool(field(cfg, "tie_embeddings")),
        dtype=layers.dtype_of(field(cfg, "dtype")),
        causal=bool(field(cfg, "causal", True)),
    )
