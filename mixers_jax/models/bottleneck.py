"""The single-vector bottleneck shared by autoencoders, embedding-augmented LMs and memory models.

e [.., d_in] -> (compress: z = e D + a_D, d_in -> d_in / c) -> quantize / noise z ->
(expand: e' = z U + a_U, back to d_in; only when c > 1) -> (bridge: Linear d_in -> d_out when the
widths differ) (docs/bottleneck.md#compression-and-bridge). Every map is linear, no nonlinearity.

``quant`` simulates storing z at lower precision (evaluation, docs/bottleneck.md#quantization-formats):
'float16', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2' cast z to that type and
back; 'int8' rounds to 127 levels of a per-vector absmax scale (the scale is one extra number per
vector). ``qat_noise = q > 0`` adds U(−q, q) to z in training (when the caller passes a 'noise'
RNG), the symmetric form (docs/bottleneck.md#qat-noise).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.models import layers

Array = jax.Array

QUANTS = ("none", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8")


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """The single-embedding path shared by the composite models (autoencoder, embedding_clm,
    memory): the encoder ``position`` whose hidden state is the embedding, compression c, the cast
    ``quant`` of the stored vector, QAT noise q, reference numerics and the compute dtype."""

    position: int = -1
    compression: int = 1
    quant: str = "none"
    qat_noise: float = 0.0
    reference: bool = True
    dtype: Any = jnp.float32

    def bottleneck_fields(self) -> dict:
        """The keyword fields a :class:`Bottleneck` / ``Compress`` takes from this spec."""
        return {"quant": self.quant, "qat_noise": self.qat_noise, "reference": self.reference,
                "dtype": self.dtype}


def quantize(x: Array, quant: str) -> Array:
    """Round-trips ``x`` through the storage format ``quant`` (same dtype out as in)."""
    if quant == "none":
        return x
    if quant == "int8":
        x32 = x.astype(jnp.float32)
        scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
        safe = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(x32 / safe), -127, 127)
        return (q * safe).astype(x.dtype)
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    return x.astype(jnp.dtype(quant)).astype(x.dtype)


class Bottleneck(nn.Module):
    """e_BxD -> e'_BxDout. Parameters: down/up (when c > 1), bridge (when d_out != d_in)."""

    d_in: int
    compression: int = 1
    d_out: int = 0  # 0: d_in
    quant: str = "none"
    qat_noise: float = 0.0
    reference: bool = True
    dtype: Any = jnp.float32

    @property
    def stored_width(self) -> int:
        """Numbers stored per embedding (d_in / c): what the compression accounting counts."""
        return self.d_in // self.compression

    def _linear(self, fan_in: int, width: int, name: str) -> layers.Linear:
        k_init, b_init = layers.linear_inits(self.reference, fan_in)
        return layers.Linear((width,), ("embed", None), kernel_init=k_init, bias_init=b_init,
                             dtype=self.dtype, gather_kernel=True, name=name)

    @nn.compact
    def __call__(self, e_BxD: Array) -> Array:
        c, d = int(self.compression), int(self.d_in)
        # One vector per row, split along the batch like every activation: left free, the SPMD
        # partitioner splits these small [B, d] arrays along their width to meet the weights and
        # can only get there by replicating them. The kernels are therefore read whole
        # (``gather_kernel``: d·d/c numbers each, the all-gather FSDP does for every weight).
        e_BxD = nn.with_logical_constraint(e_BxD, ("batch", "act_embed"))
        z = self._linear(d, d // c, "down")(e_BxD) if c > 1 else e_BxD
        z = nn.with_logical_constraint(quantize(z, self.quant), ("batch", "act_embed"))
        if self.qat_noise > 0 and self.has_rng("noise"):
            u = jax.random.uniform(self.make_rng("noise"), z.shape, jnp.float32, -1.0, 1.0)
            z = z + (self.qat_noise * u).astype(z.dtype)
        e = self._linear(d // c, d, "up")(z) if c > 1 else z
        d_out = int(self.d_out) or d
        if d_out != d:
            e = self._linear(d, d_out, "bridge")(e)
        return nn.with_logical_constraint(e, ("batch", "act_embed"))
