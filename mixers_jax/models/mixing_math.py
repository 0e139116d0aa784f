"""The math of token mixing: pure functions, the parallel and step forms of every mixing op.

Convention (docs/README.md#notation): a mixing matrix W is indexed [output position i, input
position j], ``y_i = Σ_{j≤i} W_ij x_j + c_i``, the same matrix shared by every feature (or, headed,
by every feature of one head). Causal means W_ij = 0 for j > i.

* **Parallel forms** (whole sequence at once): ``causal_mask``, ``mask_weight``,
  ``dense_causal_mix``, ``kernel_mix``, ``toeplitz_matrix``, ``toeplitz_mix_fft``, the ``headed_*``
  variants, ``add_position_bias``.
* **Step forms** (one new position i; docs/masked_mixers.md#step-forms-and-generation):
  ``flat_matrix_row`` / ``toeplitz_matrix_row`` / ``srm_matrix_row`` give row i of the matrix and
  ``cached_mix_step`` dots it with a cache of the inputs x_{≤i} (O(n·d) state); structured mixing
  also has the O(1) recurrence ``srm_step``.
* **Structured recurrent mixing** (``srm_matrix``, docs/recurrent_mixers.md#structured-matrices):
  column-repeat A_ij = v_i δ^(i−j), row-repeat A_ij = v_j δ^(i−j), δ = clip(λ, 0.9, 1)^(1/κ),
  κ = n/512, materialised as dense.

Implementations and what they compute (flops.py counts exactly this):

* 'dense', flat: ``einsum('ij,bjd->bid', W⊙M, x)``, the full n×n product (the zero upper triangle is
  multiplied too): n·d multiply-adds per token per matrix.
* 'dense', Toeplitz: the n×n matrix T_ij = v_{i−j} (j ≤ i) is materialised (a gather), then as flat.
* 'dense', flat kernel (k > 1, docs/masked_mixers.md#kernel-mixing): the k feature-shifted copies of
  x ([B, n, k, d], "same" zero padding, extra pad on the right) contracted with W ⊙ M [n, n, k] over
  (j, τ) in one dot_general: k·n·d multiply-adds per token.
* 'fft', Toeplitz only: causal convolution via real FFTs of length 2n along the sequence,
  O(d·n log n). Exact in exact arithmetic; in floating point, outputs at positions < p see round-off
  (~1e-7 relative in fp32) from inputs at p, so FFT is causal only up to round-off. The FFT always
  runs in float32 (the result is cast back to the compute dtype).

Unmasked mixing (``causal=False``, encoders; docs/masked_mixers.md#unmasked-mixing): flat and
kernel matrices without the mask; Toeplitz becomes two-sided, T_ij = v_{i−j+n−1} with v of length
2n−1 ('fft': real FFTs of length 4n). Structured mixing is causal only. Unmasked mixing has no step
form.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixers_jax.models import layers

Array = jax.Array

DECAY_MIN, DECAY_MAX = 0.9, 1.0
MASK_GRADS = ("masked", "straight_through")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def causal_mask(n: int) -> Array:
    """M [n, n] bool, M_ij = (j ≤ i)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


def mask_weight(w_xNxN: Array, mask_grad: str = "masked", taps: bool = False) -> Array:
    """W_eff = W ⊙ M over the last two axes (docs/training.md#causal-mask-gradient).

    'masked': value and gradient masked (upper entries get zero gradient).
    'straight_through': W − sg(W ⊙ (1−M)); the same value bit for bit, unmasked gradient.
    ``taps=True``: w is a kernel [..., n, n, k] and the mask is applied to every tap
    (docs/masked_mixers.md#kernel-mixing).
    """
    m_NxN = causal_mask(w_xNxN.shape[-2] if taps else w_xNxN.shape[-1])
    if taps:
        m_NxN = m_NxN[:, :, None]
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
    """y_i = Σ_{j≤i} W_ij x_j (flat, k = 1)."""
    return dense_mix(mask_weight(w_NxN, mask_grad), x_BxNxD)


def headed_dense_mix(w_HxNxN: Array, x_BxNxHxK: Array) -> Array:
    """Per head h: y^h_i = Σ_j W^h_ij x^h_j (no mask)."""
    return jnp.einsum("hij,bjhk->bihk", w_HxNxN.astype(x_BxNxHxK.dtype), x_BxNxHxK)


def add_position_bias(y_BxNx_: Array, c: Array) -> Array:
    """Adds the per-output-position bias: c_N to y [B, N, D], or c_HxN to y [B, N, H, K]."""
    if c.ndim == 1:
        c_b = c[None, :, None]
    else:  # [H, N] -> [1, N, H, 1]
        c_b = jnp.transpose(c)[None, :, :, None]
    return y_BxNx_ + c_b.astype(y_BxNx_.dtype)


# ---------------------------------------------------------------------------------------------
# Kernel ("multi-kernel", k > 1) mixing: parallel forms (docs/masked_mixers.md#kernel-mixing)
# ---------------------------------------------------------------------------------------------


def feature_taps(x: Array, k: int) -> Array:
    """x [..., F] -> [..., k, F] with tap τ holding x̃[..., f + τ − P_L], x̃ zero outside [0, F).

    "Same" padding with the extra pad on the right: P_L = ⌊(k−1)/2⌋, P_R = k−1−P_L.
    """
    f, p_left = x.shape[-1], (k - 1) // 2
    x_pad = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(p_left, k - 1 - p_left)])
    return jnp.stack([x_pad[..., t : t + f] for t in range(k)], axis=-2)


def kernel_mix(w_NxNxK: Array, x_BxNxD: Array) -> Array:
    """y_{b,i,f} = Σ_j Σ_τ W_{ijτ} x̃_{b,j,f+τ−P_L} (no mask): ``Conv1d(n, n, k)`` with positions
    as channels, sliding along the feature axis; one dot_general contracting over (j, τ)."""
    k = w_NxNxK.shape[-1]
    taps_BxNxKxD = feature_taps(x_BxNxD, k)
    return jnp.einsum("ijt,bjtd->bid", w_NxNxK.astype(x_BxNxD.dtype), taps_BxNxKxD)


def headed_kernel_mix(w_HxNxNxK: Array, x_BxNxHxK: Array) -> Array:
    """Per head h: the kernel mix of :func:`kernel_mix` over the head's d/H features."""
    k = w_HxNxNxK.shape[-1]
    taps = feature_taps(x_BxNxHxK, k)  # [B, N, H, k, K]
    return jnp.einsum("hijt,bjhtk->bihk", w_HxNxNxK.astype(x_BxNxHxK.dtype), taps)


# ---------------------------------------------------------------------------------------------
# Toeplitz mixing: parallel forms (docs/masked_mixers.md#toeplitz-mixing)
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
    """y_i = Σ_{j≤i} v_{i−j} x_j by FFT: O(d·n log n) instead of O(d·n²)."""
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


def toeplitz_matrix_two_sided(v_xM: Array) -> Array:
    """Unmasked (bidirectional) Toeplitz matrix T_ij = v_{i−j+n−1}, v of length M = 2n−1.

    v_{n−1} weights the current token, v_{n−1+m} the token m positions back and v_{n−1−m} the
    token m positions ahead. Leading axes of v are kept: v_M -> T_NxN, v_HxM -> T_HxNxN.
    """
    n = (v_xM.shape[-1] + 1) // 2
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    return jnp.take(v_xM, i - j + n - 1, axis=-1)


def toeplitz_two_sided_fft(v_xM: Array, x: Array) -> Array:
    """y_i = Σ_j v_{i−j+n−1} x_j by FFT (x [B, N, D] with v [2n−1], or x [B, N, H, K] with
    v [H, 2n−1]): the full linear convolution of v and x (length 3n−2), computed with real FFTs of
    length 4n, read at n−1 .. 2n−2. Always in float32, cast back to x's dtype."""
    n, dtype = x.shape[1], x.dtype
    length = 4 * n
    xf = jnp.fft.rfft(x.astype(jnp.float32), n=length, axis=1)
    vf = jnp.fft.rfft(v_xM.astype(jnp.float32), n=length, axis=-1)
    vf = vf[None, :, None] if v_xM.ndim == 1 else jnp.transpose(vf)[None, :, :, None]
    y = jnp.fft.irfft(xf * vf, n=length, axis=1)
    return y[:, n - 1 : 2 * n - 1].astype(dtype)


# ---------------------------------------------------------------------------------------------
# Structured recurrent mixing (docs/recurrent_mixers.md): row- / column-repeat with a clipped decay
# ---------------------------------------------------------------------------------------------


def clip_decay(lam: Array) -> Array:
    """clip(λ, 0.9, 1) whose gradient is 1 on the closed interval [0.9, 1] and 0 outside.

    docs/recurrent_mixers.md#decay-and-its-clip: λ starts at exactly 1.0, so a clip with gradient 1/2 at a tie
    (``jnp.clip``'s) would change the dynamics.
    """
    inside = (lam >= DECAY_MIN) & (lam <= DECAY_MAX)
    return jnp.where(inside, lam, jax.lax.stop_gradient(jnp.clip(lam, DECAY_MIN, DECAY_MAX)))


def srm_kappa(n: int) -> float:
    """κ = n/512 for headed (and head-less) structured mixing
    (docs/recurrent_mixers.md#decay-and-its-clip)."""
    return n / 512.0


def srm_delta(lam: Array, n: int, decay: bool = True) -> Array:
    """δ = clip(λ, 0.9, 1)^(1/κ) in float32; 1 without decay."""
    lam = lam.astype(jnp.float32)
    if not decay:
        return jnp.ones_like(lam)
    return clip_decay(lam) ** (1.0 / srm_kappa(n))


def _lags(n: int) -> tuple[Array, Array]:
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    return i >= j, jnp.clip(i - j, 0, n - 1).astype(jnp.float32)


def srm_is_col(mixing: str, heads: int) -> Array:
    """bool [H] (or [] head-less): which heads are column-repeat. 'mixed': heads 0..H/2−1 column,
    the rest row (docs/recurrent_mixers.md#mixed-heads)."""
    if mixing == "col":
        return jnp.ones((heads,) if heads else (), bool)
    if mixing == "row":
        return jnp.zeros((heads,) if heads else (), bool)
    if mixing == "mixed":
        return jnp.arange(heads) < heads // 2
    raise ValueError(f"not a structured mixing: {mixing!r}")


def srm_matrix(v_xN: Array, delta_x: Array, is_col_x: Array) -> Array:
    """The structured matrix A [..., n, n] (j ≤ i, else 0; docs/recurrent_mixers.md#structured-matrices):

    column-repeat A_ij = v_i δ^(i−j),  row-repeat A_ij = v_j δ^(i−j).
    Leading axes of v (heads) match those of δ and is_col.
    """
    n = v_xN.shape[-1]
    d = delta_x[..., None, None]
    mask, lag = (layers.leading_axes(a, d.ndim) for a in _lags(n))
    decay_xNxN = jnp.where(mask, d ** lag, jnp.zeros_like(d * lag))
    v = v_xN.astype(jnp.float32)
    col = v[..., :, None] * decay_xNxN
    row = decay_xNxN * v[..., None, :]
    return jnp.where(is_col_x[..., None, None], col, row)


def srm_matrix_row(v_xN: Array, delta_x: Array, is_col_x: Array, pos: Array) -> Array:
    """Row ``pos`` of :func:`srm_matrix` ([..., n]) computed with the very same formula."""
    n = v_xN.shape[-1]
    j = jnp.arange(n)
    d = delta_x[..., None]
    mask = layers.leading_axes(j <= pos, d.ndim)
    lag = layers.leading_axes(jnp.clip(pos - j, 0, n - 1).astype(jnp.float32), d.ndim)
    decay_xN = jnp.where(mask, d ** lag, jnp.zeros_like(d * lag))
    v = v_xN.astype(jnp.float32)
    v_i = jax.lax.dynamic_index_in_dim(v, pos, axis=-1, keepdims=True)
    col = v_i * decay_xN
    row = decay_xN * v
    return jnp.where(is_col_x[..., None], col, row)


def srm_step(s: Array, z: Array, v_xN: Array, delta_x: Array, is_col_x: Array, pos: Array):
    """One step of the O(1) recurrence at absolute position ``pos``
    (docs/recurrent_mixers.md#structured-matrices):

    column-repeat  s_i = x_i + δ s_{i−1},     y_i = v_i s_i
    row-repeat     s_i = v_i x_i + δ s_{i−1},  y_i = s_i
    (the bias is added by the caller). s, z: [B, d] head-less or [B, H, K]; the state is float32
    and stored directly (no division by v_i). Returns (y, new s).
    """
    v_i = jax.lax.dynamic_index_in_dim(v_xN.astype(jnp.float32), pos, axis=-1, keepdims=False)
    if z.ndim == 3:  # [B, H, K]: per-head scalars broadcast over batch and head width
        v_i, delta, is_col = v_i[None, :, None], delta_x[None, :, None], is_col_x[None, :, None]
    else:
        delta, is_col = delta_x, is_col_x
    z = z.astype(jnp.float32)
    s = delta * s + jnp.where(is_col, z, v_i * z)
    y = jnp.where(is_col, v_i * s, s)
    return y, s


# ---------------------------------------------------------------------------------------------
# Step forms of the matrix mixers: one position from a cache of the mixing inputs
# ---------------------------------------------------------------------------------------------


def flat_matrix_row(w_xNxN: Array, pos: Array, mask_grad: str = "masked") -> Array:
    """Row ``pos`` of W ⊙ M: [..., n] (entries j > pos are zero)."""
    row = jax.lax.dynamic_index_in_dim(w_xNxN, pos, axis=-2, keepdims=False)
    return jnp.where(jnp.arange(w_xNxN.shape[-1]) <= pos, row, jnp.zeros_like(row))


def toeplitz_matrix_row(v_xN: Array, pos: Array) -> Array:
    """Row ``pos`` of the causal Toeplitz matrix: T_pos,j = v_{pos−j} (j ≤ pos), [..., n]."""
    n = v_xN.shape[-1]
    j = jnp.arange(n)
    t = jnp.take(v_xN, jnp.clip(pos - j, 0, n - 1), axis=-1)
    return jnp.where(j <= pos, t, jnp.zeros_like(t))


def cached_mix_step(row_xN: Array, cache: Array) -> Array:
    """Σ_j row_j cache_j: cache [B, n, d] with row [n], or cache [B, n, H, K] with row [H, n].

    The same sum in two forms, chosen by the (static) batch: from B = 2 on a broadcast product summed
    over j, because XLA:CPU lowers the einsum to a dot that first transposes the whole cache (j
    last) at every step; at B = 1 the einsum, because there the broadcast sum becomes a reduction
    over the major axis of [n, d] that XLA:CPU runs far slower than the dot. Cached generation at
    n_ctx 512, d256 L4 (docs/mixing_performance.md#cached-steps): einsum / broadcast tokens/s 15x
    at B = 1, 0.5x at B = 64."""
    row = row_xN.astype(cache.dtype)
    if cache.shape[0] == 1:
        if cache.ndim == 3:
            return jnp.einsum("j,bjd->bd", row, cache)
        return jnp.einsum("hj,bjhk->bhk", row, cache)
    if cache.ndim == 3:
        return jnp.sum(row[None, :, None] * cache, axis=1)
    return jnp.sum(row.T[None, :, :, None] * cache, axis=1)


def kernel_matrix_row(w_xNxNxK: Array, pos: Array) -> Array:
    """Row ``pos`` of the per-tap masked kernel W ⊙ M: [..., n, k] (entries j > pos are zero)."""
    row = jax.lax.dynamic_index_in_dim(w_xNxNxK, pos, axis=-3, keepdims=False)
    keep = (jnp.arange(w_xNxNxK.shape[-2]) <= pos)[:, None]
    return jnp.where(keep, row, jnp.zeros_like(row))


def cached_kernel_step(row_xNxK: Array, cache: Array) -> Array:
    """Step form of :func:`kernel_mix`: Σ_j Σ_τ row_{jτ} x̃_{j, f+τ−P_L} over the cached inputs
    (cache [B, n, d] with row [n, k], or cache [B, n, H, K] with row [H, n, k])."""
    row = row_xNxK.astype(cache.dtype)
    taps = feature_taps(cache, row.shape[-1])
    if cache.ndim == 3:
        return jnp.einsum("jt,bjtd->bd", row, taps)
    return jnp.einsum("hjt,bjhtk->bhk", row, taps)


def position_bias_at(c: Array, pos: Array) -> Array:
    """c[..., pos] shaped to add to a step output: [] -> broadcast over [B, d]; [H] -> [1, H, 1]."""
    c_i = jax.lax.dynamic_index_in_dim(c, pos, axis=-1, keepdims=False)
    return c_i[None, :, None] if c.ndim == 2 else c_i


# ---------------------------------------------------------------------------------------------
# Initialisers for the mixing parameters
# ---------------------------------------------------------------------------------------------


def row_scaled_normal(key, shape, dtype=jnp.float32):
    """W_ij ~ N(0, 1/(i+1)) over the last two axes [i, j] (reference=False flat init)."""
    n = shape[-2]
    scale_N = 1.0 / jnp.sqrt(jnp.arange(1, n + 1, dtype=dtype))
    return jax.random.normal(key, shape, dtype) * scale_N[:, None]


def row_scaled_kernel_normal(key, shape, dtype=jnp.float32):
    """W_ijτ ~ N(0, 1/((i+1)·k)) for a kernel [..., n, n, k] (reference=False, causal, k > 1)."""
    n, k = shape[-3], shape[-1]
    scale_N = 1.0 / jnp.sqrt(jnp.arange(1, n + 1, dtype=dtype) * k)
    return jax.random.normal(key, shape, dtype) * scale_N[:, None, None]


def kaiming_inits(fan_in: int):
    """v ~ N(0, 2/fan_in), c = 0: structured vectors, and every mixing op in the SRM block
    (docs/training.md#initialisation)."""
    return layers.normal(math.sqrt(2.0 / fan_in)), layers.zeros
