"""Token-mixing ops: causal mixing over the sequence axis (REFERENCE §1.1, §2.1, §2.3).

Convention (REFERENCE notation): a mixing matrix W is indexed [output position i, input position j],
``y_i = Σ_{j≤i} W_ij x_j + c_i``, the same matrix shared by every feature (or, headed, by every
feature of one head). Causal means W_ij = 0 for j > i.

The file has two layers:

* pure functions of the math (``causal_mask``, ``mask_weight``, ``dense_causal_mix``,
  ``toeplitz_matrix``, ``toeplitz_mix_fft``, the ``headed_*`` variants, ``add_position_bias``);
  each is the **parallel form** (whole sequence at once). A **step form** (one new position i given
  a cache of the inputs x_{≤i}; DESIGN "Token mixing") belongs next to each parallel form:
  ``dense_causal_mix_step(w_row_N, cache_BxNxD, i)`` = Σ_{j≤i} W_ij cache_j, and for Toeplitz the
  dot of v[:i+1] reversed with the cache. They are not written yet.
* ``TokenMixing``: the Flax module owning the parameters (W or v, bias c, optional per-head
  projections) and choosing the implementation (``impl``: 'dense' | 'fft').

Implementations and what they compute (flops.py counts exactly this):

* 'dense', flat: ``einsum('ij,bjd->bid', W⊙M, x)``, the full n×n product (the zero upper triangle is
  multiplied too): n·d multiply-adds per token per matrix.
* 'dense', Toeplitz: the n×n matrix T_ij = v_{i−j} (j ≤ i) is materialised (a gather), then as flat.
* 'fft', Toeplitz only: causal convolution via real FFTs of length 2n along the sequence,
  O(d·n log n). Exact in exact arithmetic; in floating point, outputs at positions < p see round-off
  (~1e-7 relative in fp32) from inputs at p, so FFT is causal only up to round-off. The FFT always
  runs in float32 (the result is cast back to the compute dtype).

Initialisation (``reference`` flag, REFERENCE §1):

* reference=True (PyTorch defaults of the published models): flat W, c ~ U(±1/√n) (Conv1d(n, n, 1),
  fan_in = n); Toeplitz v ~ N(0, 1), c = 0.
* reference=False (our choice): flat W_ij ~ N(0, 1/(i+1)), i.e. variance-preserving for each output
  row given its i+1 causal inputs (the upper triangle is drawn too but never used); Toeplitz
  v ~ N(0, 1/n), so the last row (which sums all n taps) has unit gain and earlier rows less; c = 0.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.models import layers

Array = jax.Array
Dtype = Any

MIXINGS = ("flat", "toeplitz")
IMPLS = ("dense", "fft")
MASK_GRADS = ("masked", "straight_through")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def causal_mask(n: int) -> Array:
    """M [n, n] bool, M_ij = (j ≤ i)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


def mask_weight(w_xNxN: Array, mask_grad: str = "masked") -> Array:
    """W_eff = W ⊙ M over the last two axes (REFERENCE §1.1).

    'masked': value and gradient masked (upper entries get zero gradient).
    'straight_through': W − sg(W ⊙ (1−M)); the same value bit for bit, unmasked gradient.
    """
    m_NxN = causal_mask(w_xNxN.shape[-1])
    if mask_grad == "masked":
        return jnp.where(m_NxN, w_xNxN, jnp.zeros_like(w_xNxN))
    if mask_grad == "straight_through":
        upper = jnp.where(m_NxN, jnp.zeros_like(w_xNxN), w_xNxN)
        return w_xNxN - jax.lax.stop_gradient(upper)
    raise ValueError(f"mask_grad must be one of {MASK_GRADS}, got {mask_grad!r}")


# ---------------------------------------------------------------------------------------------
# Dense (flat) mixing: parallel forms
# ---------------------------------------------------------------------------------------------


def dense_mix(w_NxN: Array, x_BxNxD: Array) -> Array:
    """y_i = Σ_j W_ij x_j (no mask): the full n×n product, one matrix for all features."""
    return jnp.einsum("ij,bjd->bid", w_NxN.astype(x_BxNxD.dtype), x_BxNxD)


def dense_causal_mix(w_NxN: Array, x_BxNxD: Array, mask_grad: str = "masked") -> Array:
    """y_i = Σ_{j≤i} W_ij x_j (REFERENCE §2.1, flat, k = 1)."""
    return dense_mix(mask_weight(w_NxN, mask_grad), x_BxNxD)


def headed_dense_mix(w_HxNxN: Array, x_BxNxHxK: Array) -> Array:
    """Per head h: y^h_i = Σ_j W^h_ij x^h_j (no mask)."""
    return jnp.einsum("hij,bjhk->bihk", w_HxNxN.astype(x_BxNxHxK.dtype), x_BxNxHxK)


def headed_dense_causal_mix(w_HxNxN: Array, x_BxNxHxK: Array, mask_grad: str = "masked") -> Array:
    """Per head h: y^h_i = Σ_{j≤i} W^h_ij x^h_j (REFERENCE §2.1, multi-headed)."""
    return headed_dense_mix(mask_weight(w_HxNxN, mask_grad), x_BxNxHxK)


def add_position_bias(y_BxNx_: Array, c: Array) -> Array:
    """Adds the per-output-position bias: c_N to y [B, N, D], or c_HxN to y [B, N, H, K]."""
    if c.ndim == 1:
        c_b = c[None, :, None]
    else:  # [H, N] -> [1, N, H, 1]
        c_b = jnp.transpose(c)[None, :, :, None]
    return y_BxNx_ + c_b.astype(y_BxNx_.dtype)


# ---------------------------------------------------------------------------------------------
# Toeplitz mixing: parallel forms (REFERENCE §2.3)
# ---------------------------------------------------------------------------------------------


def toeplitz_matrix(v_xN: Array) -> Array:
    """Causal Toeplitz matrix T_ij = v_{i−j} for j ≤ i, else 0; leading axes of v are kept.

    v_N -> T_NxN, v_HxN -> T_HxNxN. v_0 weights the current token.
    """
    n = v_xN.shape[-1]
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    lag_NxN = jnp.clip(i - j, 0, n - 1)
    t = jnp.take(v_xN, lag_NxN, axis=-1)  # [..., n, n]
    return jnp.where(i >= j, t, jnp.zeros_like(t))


def toeplitz_mix_fft(v_N: Array, x_BxNxD: Array) -> Array:
    """y_i = Σ_{j≤i} v_{i−j} x_j by FFT: O(d·n log n) instead of O(d·n²) (REFERENCE §2.3)."""
    n, dtype = x_BxNxD.shape[1], x_BxNxD.dtype
    xf_BxFxD = jnp.fft.rfft(x_BxNxD.astype(jnp.float32), n=2 * n, axis=1)
    vf_F = jnp.fft.rfft(v_N.astype(jnp.float32), n=2 * n)
    y_Bx2NxD = jnp.fft.irfft(xf_BxFxD * vf_F[None, :, None], n=2 * n, axis=1)
    return y_Bx2NxD[:, :n].astype(dtype)


def headed_toeplitz_mix_fft(v_HxN: Array, x_BxNxHxK: Array) -> Array:
    """Per head h: y^h_i = Σ_{j≤i} v^h_{i−j} x^h_j by FFT."""
    n, dtype = x_BxNxHxK.shape[1], x_BxNxHxK.dtype
    xf_BxFxHxK = jnp.fft.rfft(x_BxNxHxK.astype(jnp.float32), n=2 * n, axis=1)
    vf_HxF = jnp.fft.rfft(v_HxN.astype(jnp.float32), n=2 * n, axis=-1)
    y = jnp.fft.irfft(xf_BxFxHxK * jnp.transpose(vf_HxF)[None, :, :, None], n=2 * n, axis=1)
    return y[:, :n].astype(dtype)


def toeplitz_mix_dense(v_N: Array, x_BxNxD: Array) -> Array:
    """Toeplitz mixing by materialising T (n×n) and one dense matmul."""
    return dense_mix(toeplitz_matrix(v_N), x_BxNxD)


def headed_toeplitz_mix_dense(v_HxN: Array, x_BxNxHxK: Array) -> Array:
    return headed_dense_mix(toeplitz_matrix(v_HxN), x_BxNxHxK)


def causal_mix(
    x: Array,
    *,
    mixing: str,
    c: Array,
    w: Array | None = None,
    v: Array | None = None,
    impl: str = "dense",
    mask_grad: str = "masked",
) -> Array:
    """One causal mixing matrix applied to x [B,N,D] (w_NxN / v_N) or x [B,N,H,K] (w_HxNxN / v_HxN),
    plus the per-position bias c. Dispatches on ``mixing`` and ``impl``."""
    headed = x.ndim == 4
    if mixing == "flat":
        if impl != "dense":
            raise ValueError(f"flat mixing has only the 'dense' implementation, got {impl!r}")
        y = (headed_dense_causal_mix if headed else dense_causal_mix)(w, x, mask_grad)
    elif mixing == "toeplitz":
        if impl == "dense":
            y = (headed_toeplitz_mix_dense if headed else toeplitz_mix_dense)(v, x)
        elif impl == "fft":
            y = (headed_toeplitz_mix_fft if headed else toeplitz_mix_fft)(v, x)
        else:
            raise ValueError(f"mixing_impl must be one of {IMPLS}, got {impl!r}")
    else:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    return add_position_bias(y, c)


# ---------------------------------------------------------------------------------------------
# Initialisers for the mixing parameters
# ---------------------------------------------------------------------------------------------


def row_scaled_normal(key, shape, dtype=jnp.float32):
    """W_ij ~ N(0, 1/(i+1)) over the last two axes [i, j] (reference=False flat init)."""
    n = shape[-2]
    scale_N = 1.0 / jnp.sqrt(jnp.arange(1, n + 1, dtype=dtype))
    return jax.random.normal(key, shape, dtype) * scale_N[:, None]


def mixing_inits(mixing: str, reference: bool, n: int):
    """(weight_init, bias_init) for one mixing matrix (see the module docstring)."""
    if mixing == "flat":
        if reference:
            return layers.uniform_fan_in(n), layers.uniform_fan_in(n)
        return row_scaled_normal, layers.zeros
    if reference:
        return layers.normal(1.0), layers.zeros
    return layers.normal(1.0 / math.sqrt(n)), layers.zeros


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class TokenMixing(nn.Module):
    """Causal token mixing x [B, n, d] -> [B, n, d] (REFERENCE §2.1, §2.3).

    heads == 0: one matrix shared by all d features, no projections.
    heads == H ≥ 1: per-head projection d -> d/H (bias), a per-head matrix and bias, concatenation
    and an output projection d -> d (bias); no nonlinearity.
    expanded: mix -> GELU -> mix (both causal, factor 1), inside each head when headed.

    Parameters (leading 'heads' axis only when headed):
      flat:      w [H?, n, n] ('heads', 'seq_out', 'seq_in'), c [H?, n] ('heads', 'seq_out')
      toeplitz:  v [H?, n]    ('heads', 'seq_in'),            c [H?, n]
      expanded:  w1/v1, c1, w2/v2, c2 instead of w/v, c
      headed:    proj/kernel [d, H, d/H] ('embed', 'heads', 'head_dim'), proj/bias [H, d/H],
                 out/kernel [H, d/H, d] ('heads', 'head_dim', 'embed'), out/bias [d]
    """

    n_ctx: int
    d_model: int
    mixing: str = "flat"
    heads: int = 0
    impl: str = "dense"
    expanded: bool = False
    mask_grad: str = "masked"
    reference: bool = True
    dtype: Dtype = jnp.float32

    def _matrix(self, suffix: str) -> dict:
        n, h = self.n_ctx, self.heads
        head_shape, head_axes = ((h,), ("heads",)) if h else ((), ())
        w_init, c_init = mixing_inits(self.mixing, self.reference, n)
        if self.mixing == "flat":
            weight = self.param(
                "w" + suffix,
                nn.with_logical_partitioning(w_init, head_axes + ("seq_out", "seq_in")),
                head_shape + (n, n),
                jnp.float32,
            )
        else:
            weight = self.param(
                "v" + suffix,
                nn.with_logical_partitioning(w_init, head_axes + ("seq_in",)),
                head_shape + (n,),
                jnp.float32,
            )
        c = self.param(
            "c" + suffix,
            nn.with_logical_partitioning(c_init, head_axes + ("seq_out",)),
            head_shape + (n,),
            jnp.float32,
        )
        key = "w" if self.mixing == "flat" else "v"
        return {key: weight, "c": c}

    def _mix(self, z: Array, suffix: str) -> Array:
        return causal_mix(
            z,
            mixing=self.mixing,
            impl=self.impl,
            mask_grad=self.mask_grad,
            **self._matrix(suffix),
        )

    @nn.compact
    def __call__(self, x_BxNxD: Array) -> Array:
        n, d, h = self.n_ctx, self.d_model, self.heads
        if x_BxNxD.shape[1] != n:
            raise ValueError(f"token mixing expects {n} positions, got {x_BxNxD.shape[1]}")
        x_BxNxD = x_BxNxD.astype(self.dtype)
        if h:
            k_init, b_init = layers.linear_inits(self.reference, d)
            z = layers.Linear(
                (h, d // h),
                ("embed", "heads", "head_dim"),
                kernel_init=k_init,
                bias_init=b_init,
                dtype=self.dtype,
                name="proj",
            )(x_BxNxD)
            z = nn.with_logical_constraint(z, ("batch", "length", "act_heads", None))
        else:
            z = x_BxNxD
        if self.expanded:
            u = self._mix(z, "1")
            u = layers.gelu(u, self.reference)
            u = self._mix(u, "2")
        else:
            u = self._mix(z, "")
        if h:
            k_init, b_init = layers.linear_inits(self.reference, d)
            u = layers.Linear(
                (d,),
                ("heads", "head_dim", "embed"),
                n_in=2,
                kernel_init=k_init,
                bias_init=b_init,
                dtype=self.dtype,
                name="out",
            )(u)
        return u
