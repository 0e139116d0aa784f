"""Token-mixing ops: causal mixing over the sequence axis (docs/masked_mixers.md).

Convention (docs/README.md#notation): a mixing matrix W is indexed [output position i, input position j],
``y_i = Σ_{j≤i} W_ij x_j + c_i``, the same matrix shared by every feature (or, headed, by every
feature of one head). Causal means W_ij = 0 for j > i.

The file has three layers:

* pure functions of the math (``causal_mask``, ``mask_weight``, ``dense_causal_mix``,
  ``toeplitz_matrix``, ``toeplitz_mix_fft``, the ``headed_*`` variants, ``add_position_bias``);
  each is the **parallel form** (whole sequence at once). The **step forms** (one new position i;
  docs/masked_mixers.md#step-forms-and-generation) sit next to them:
  ``flat_matrix_row`` / ``toeplitz_matrix_row`` /
  ``srm_matrix_row`` give row i of the matrix and ``cached_mix_step`` dots it with a cache of the
  inputs x_{≤i} (O(n·d) state); structured mixing also has the O(1) recurrence ``srm_step``.
  Structured recurrent mixing (``srm_matrix``, docs/recurrent_mixers.md#structured-matrices):
  column-repeat A_ij = v_i δ^(i−j),
  row-repeat A_ij = v_j δ^(i−j), δ = clip(λ, 0.9, 1)^(1/κ), κ = n/512, materialised as dense.
* **the table of mixing ops**, :data:`MIXING_OPS`: one frozen :class:`MixingOp` per op ('flat',
  'toeplitz', 'row', 'col', 'mixed') with its weight (name, shape, logical axes) and inits, its
  effective n×n matrix as a function of its parameters (causal and unmasked), the row of that
  matrix for the cached step form, its O(d)-state recurrent step (if any), its FFT implementation
  (if any), its forward FLOPs per token, and its constraints (kernel taps, unmasked form,
  straight-through mask gradient, minimum heads; :func:`check_mixing` raises the ``UserError``
  that ``build_model`` reports). The models, ``flops.py``, ``inspect.py`` (effective matrices) and
  ``generate.py`` (which step modes exist) read the table; nothing else compares op names.
  **Adding a mixing op** = one entry in :data:`MIXING_OPS` (plus its math functions above) and
  one line in the ``VARIANTS`` of ``tests/test_step_forms.py`` (its step forms must equal its
  parallel form; ``tests/test_inspect.py`` checks its matrix against the layer's Jacobian by
  itself, for every entry of the table).
* ``TokenMixing``: the Flax module owning the parameters (W or v, bias c, optional per-head
  projections), configured by one :class:`MixingSpec`; the op and ``impl`` ('dense' | 'fft')
  choose the computation.

Implementations and what they compute (flops.py counts exactly this):

* 'dense', flat: ``einsum('ij,bjd->bid', W⊙M, x)``, the full n×n product (the zero upper triangle is
  multiplied too): n·d multiply-adds per token per matrix.
* 'dense', Toeplitz: the n×n matrix T_ij = v_{i−j} (j ≤ i) is materialised (a gather), then as flat.
* 'dense', flat kernel (k > 1, docs/masked_mixers.md#kernel-mixing):
  the k feature-shifted copies of x ([B, n, k, d], "same"
  zero padding, extra pad on the right) contracted with W ⊙ M [n, n, k] over (j, τ) in one
  dot_general: k·n·d multiply-adds per token.
* 'fft', Toeplitz only: causal convolution via real FFTs of length 2n along the sequence,
  O(d·n log n). Exact in exact arithmetic; in floating point, outputs at positions < p see round-off
  (~1e-7 relative in fp32) from inputs at p, so FFT is causal only up to round-off. The FFT always
  runs in float32 (the result is cast back to the compute dtype).

Unmasked mixing (``causal=False``, encoders and retrieval heads,
docs/masked_mixers.md#unmasked-mixing): flat and kernel
matrices without the mask; Toeplitz becomes two-sided, T_ij = v_{i−j+n−1} with v of length 2n−1
('fft': real FFTs of length 4n). Structured mixing is causal only. Unmasked mixing has no step form.

Initialisation (``reference`` flag, docs/training.md#initialisation):

* reference=True (PyTorch defaults of the published models): flat W, c ~ U(±1/√n) (Conv1d(n, n, 1),
  fan_in = n); Toeplitz v ~ N(0, 1), c = 0.
* reference=False (our choice): flat W_ij ~ N(0, 1/(i+1)), i.e. variance-preserving for each output
  row given its i+1 causal inputs (the upper triangle is drawn too but never used); Toeplitz
  v ~ N(0, 1/n), so the last row (which sums all n taps) has unit gain and earlier rows less; c = 0.
* kernel k > 1: fan_in n·k (U(±1/√(n·k)); N(0, 1/((i+1)·k))); unmasked flat with reference=False:
  N(0, 1/(n·k)). A two-sided Toeplitz v has the causal v's init.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError
from mixers_jax.models import layers

Array = jax.Array
Dtype = Any

CACHE_MODES = ("cached", "recurrent")
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


def headed_dense_causal_mix(w_HxNxN: Array, x_BxNxHxK: Array, mask_grad: str = "masked") -> Array:
    """Per head h: y^h_i = Σ_{j≤i} W^h_ij x^h_j (multi-headed)."""
    return headed_dense_mix(mask_weight(w_HxNxN, mask_grad), x_BxNxHxK)


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
    """Σ_j row_j cache_j: cache [B, n, d] with row [n], or cache [B, n, H, K] with row [H, n]."""
    row = row_xN.astype(cache.dtype)
    if cache.ndim == 3:
        return jnp.einsum("j,bjd->bd", row, cache)
    return jnp.einsum("hj,bjhk->bhk", row, cache)


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


def _flat_inits(s: "MixingSpec", reference: bool):
    """Flat kernel mixing (k > 1) is ``Conv1d(n, n, k)``: fan_in = n·k, so the reference init is
    W, c ~ U(±1/√(n·k)); reference=False: N(0, 1/((i+1)·k)) causal, N(0, 1/(n·k)) unmasked (every
    output row sums all n·k inputs)."""
    fan_in = s.n_ctx * s.kernel
    if reference:
        return layers.uniform_fan_in(fan_in), layers.uniform_fan_in(fan_in)
    if not s.causal:
        return layers.normal(1.0 / math.sqrt(fan_in)), layers.zeros
    return (row_scaled_normal if s.kernel == 1 else row_scaled_kernel_normal), layers.zeros


def _toeplitz_inits(s: "MixingSpec", reference: bool):
    if reference:
        return layers.normal(1.0), layers.zeros
    return layers.normal(1.0 / math.sqrt(s.n_ctx)), layers.zeros


def _srm_inits(s: "MixingSpec", reference: bool):
    return kaiming_inits(s.n_ctx)


# ---------------------------------------------------------------------------------------------
# The table of mixing ops
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixingSpec:
    """The hyper-parameters of one token-mixing layer (:class:`TokenMixing`), and all that fixes
    what its matrices compute besides their parameters: length n_ctx, width d_model, the op
    (``mixing``), heads (0: one matrix for all features), implementation, expanded (mix -> GELU ->
    mix), mask gradient, reference numerics, decay, Kaiming init (the SRM block), kernel taps k,
    causal or unmasked, compute dtype."""

    n_ctx: int
    d_model: int
    mixing: str = "flat"
    heads: int = 0
    impl: str = "dense"
    expanded: bool = False
    mask_grad: str = "masked"
    reference: bool = True
    decay: bool = True
    kaiming: bool = False
    kernel: int = 1
    causal: bool = True
    dtype: Dtype = jnp.float32

    @property
    def op(self) -> "MixingOp":
        return MIXING_OPS[self.mixing]


@dataclasses.dataclass(frozen=True)
class MixingOp:
    """One token-mixing op. ``p`` is the dict of one matrix's parameters without suffix
    ({weight, 'c'} plus 'lam' when ``decay``), with a leading [H] axis when headed.

    weight_shape(s) -> (shape, logical axes) of the weight without the head axis;
    inits(s, reference) -> (weight init, bias init) (the SRM block overrides both with
    :func:`kaiming_inits`); matrix(p, s) -> the effective matrix A [(H,) n, n] the dense forward
    applies (kernel: [(H,) n, n, k], one matrix per tap), causal or unmasked per ``s.causal``;
    row(p, pos, s) -> row ``pos`` of the causal A (the cached step form dots it with the inputs
    x_{≤pos}); recurrent(state, z, p, pos, s) -> (y, state): the O(d)-state step, if the op has one;
    fft(p, x, s) -> y: the 'fft' implementation, if any; flops_per_token(s, d) -> forward FLOPs
    per token of one matrix over d features (flops.py conventions). Constraints: ``kernel`` (k > 1
    allowed), ``unmasked`` (causal=False allowed), ``straight_through`` (mask_grad allowed),
    ``min_heads``.
    """

    name: str
    weight: str
    weight_shape: Callable[[MixingSpec], tuple[tuple[int, ...], tuple]]
    inits: Callable[[MixingSpec, bool], tuple[Callable, Callable]]
    matrix: Callable[[dict, MixingSpec], Array]
    row: Callable[[dict, Array, MixingSpec], Array]
    flops_per_token: Callable[[MixingSpec, int], float]
    fft: Callable[[dict, Array, MixingSpec], Array] | None = None
    recurrent: Callable | None = None
    decay: bool = False
    kernel: bool = False
    unmasked: bool = True
    straight_through: bool = False
    min_heads: int = 0

    @property
    def impls(self) -> tuple[str, ...]:
        return ("dense", "fft") if self.fft is not None else ("dense",)


def dense_flops_per_token(s: MixingSpec, d: int) -> float:
    """The materialised product (k feature-shifted copies for kernel mixing): k·n·d multiply-adds."""
    return 2.0 * s.n_ctx * d * s.kernel


def fft_flops_per_token(n: int, d: int, length: int) -> float:
    """One FFT convolution over d features with real FFTs of ``length`` (2n: causal; 4n: unmasked
    two-sided): 2 FFTs of 2.5·L·log2 L and 3·L pointwise, per n tokens."""
    return d * (5.0 * length * math.log2(length) + 3.0 * length) / n


# flat: A = W ⊙ M (unmasked: W); kernel k > 1: per tap.


def _flat_shape(s: MixingSpec):
    taps_shape, taps_axes = ((s.kernel,), (None,)) if s.kernel > 1 else ((), ())
    return (s.n_ctx, s.n_ctx) + taps_shape, ("seq_out", "seq_in") + taps_axes


def _flat_matrix(p: dict, s: MixingSpec) -> Array:
    if not s.causal:
        return p["w"]
    return mask_weight(p["w"], s.mask_grad, taps=s.kernel > 1)


def _flat_row(p: dict, pos: Array, s: MixingSpec) -> Array:
    if s.kernel > 1:
        return kernel_matrix_row(p["w"], pos)
    return flat_matrix_row(p["w"], pos, s.mask_grad)


# toeplitz: T_ij = v_{i−j} (j ≤ i); unmasked: two-sided T_ij = v_{i−j+n−1}, v of length 2n−1.


def _toeplitz_shape(s: MixingSpec):
    return ((s.n_ctx if s.causal else 2 * s.n_ctx - 1),), ("seq_in",)


def _toeplitz_matrix(p: dict, s: MixingSpec) -> Array:
    return toeplitz_matrix(p["v"]) if s.causal else toeplitz_matrix_two_sided(p["v"])


def _toeplitz_row(p: dict, pos: Array, s: MixingSpec) -> Array:
    return toeplitz_matrix_row(p["v"], pos)


def _toeplitz_fft(p: dict, x: Array, s: MixingSpec) -> Array:
    if not s.causal:
        return toeplitz_two_sided_fft(p["v"], x)
    return (headed_toeplitz_mix_fft if x.ndim == 4 else toeplitz_mix_fft)(p["v"], x)


def _toeplitz_flops(s: MixingSpec, d: int) -> float:
    if s.impl == "fft":
        return fft_flops_per_token(s.n_ctx, d, 2 * s.n_ctx if s.causal else 4 * s.n_ctx)
    return dense_flops_per_token(s, d)


# structured recurrent (row / col / mixed, docs/recurrent_mixers.md): column-repeat A_ij = v_i δ^(i−j),
# row-repeat A_ij = v_j δ^(i−j), δ = clip(λ, 0.9, 1)^(1/κ).


def _srm_shape(s: MixingSpec):
    return (s.n_ctx,), ("seq_in",)


def _srm_parts(p: dict, s: MixingSpec) -> tuple[Array, Array]:
    return srm_delta(p["lam"], s.n_ctx, s.decay), srm_is_col(s.mixing, s.heads)


def _srm_matrix(p: dict, s: MixingSpec) -> Array:
    return srm_matrix(p["v"], *_srm_parts(p, s))


def _srm_row(p: dict, pos: Array, s: MixingSpec) -> Array:
    return srm_matrix_row(p["v"], *_srm_parts(p, s), pos)


def _srm_recurrent(state: Array, z: Array, p: dict, pos: Array, s: MixingSpec):
    return srm_step(state, z, p["v"], *_srm_parts(p, s), pos)


def _structured(name: str, min_heads: int = 0) -> MixingOp:
    return MixingOp(name=name, weight="v", weight_shape=_srm_shape, inits=_srm_inits,
                    matrix=_srm_matrix, row=_srm_row, flops_per_token=dense_flops_per_token,
                    recurrent=_srm_recurrent, decay=True, unmasked=False, min_heads=min_heads)


MIXING_OPS: dict[str, MixingOp] = {
    "flat": MixingOp(name="flat", weight="w", weight_shape=_flat_shape, inits=_flat_inits,
                     matrix=_flat_matrix, row=_flat_row, flops_per_token=dense_flops_per_token,
                     kernel=True, straight_through=True),
    "toeplitz": MixingOp(name="toeplitz", weight="v", weight_shape=_toeplitz_shape,
                         inits=_toeplitz_inits, matrix=_toeplitz_matrix, row=_toeplitz_row,
                         flops_per_token=_toeplitz_flops, fft=_toeplitz_fft),
    "row": _structured("row"),
    "col": _structured("col"),
    "mixed": _structured("mixed", min_heads=2),  # heads 0..H/2−1 column-, the rest row-repeat
}
MIXINGS = tuple(MIXING_OPS)
SRM_MIXINGS = tuple(name for name, op in MIXING_OPS.items() if op.recurrent is not None)
IMPLS = tuple(dict.fromkeys(impl for op in MIXING_OPS.values() for impl in op.impls))


def check_mixing(mixing: Any, impl: Any, mask_grad: Any, heads: Any, kernel: Any, causal: Any) -> None:
    """Raises ``UserError`` (naming the ``model.`` field) unless the table allows the combination."""
    if mixing not in MIXING_OPS:
        raise UserError(f"model.mixing must be one of {MIXINGS}, got {mixing!r}")
    op = MIXING_OPS[mixing]
    if impl not in IMPLS:
        raise UserError(f"model.mixing_impl must be one of {IMPLS}, got {impl!r}")
    if impl not in op.impls:
        raise UserError(f"model.mixing={mixing!r} has only mixing_impl {op.impls} (got {impl!r})")
    if mask_grad not in MASK_GRADS:
        raise UserError(f"model.mask_grad must be one of {MASK_GRADS}, got {mask_grad!r}")
    if mask_grad == "straight_through" and not op.straight_through:
        raise UserError(
            f"model.mask_grad='straight_through' does not apply to model.mixing={mixing!r} (it has "
            "no upper-triangle parameters); use mask_grad='masked'")
    if not isinstance(heads, int) or heads < 0:
        raise UserError(f"model.heads must be an integer >= 0, got {heads!r}")
    if heads < op.min_heads:
        raise UserError(f"model.mixing={mixing!r} needs model.heads >= {op.min_heads}")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise UserError(f"model.kernel must be an integer >= 1, got {kernel!r}")
    if kernel > 1 and not op.kernel:
        raise UserError(
            f"model.kernel={kernel} (kernel mixing) is not available for model.mixing={mixing!r}")
    if not causal and not op.unmasked:
        raise UserError(f"model.mixing={mixing!r} is causal only; model.causal=False needs one of "
                        f"{tuple(k for k, o in MIXING_OPS.items() if o.unmasked)}")
    if not causal and mask_grad == "straight_through":
        raise UserError(
            "model.mask_grad='straight_through' needs causal mixing (causal=False has no mask)")


def mixing_inits(spec: MixingSpec) -> tuple[Callable, Callable]:
    """(weight init, bias init) of one matrix: the op's, or Kaiming with fan_in = n·k in the SRM
    block (``spec.kaiming``)."""
    if spec.kaiming:
        return kaiming_inits(spec.n_ctx * spec.kernel)
    return spec.op.inits(spec, spec.reference)


def apply_matrix(a: Array, x: Array) -> Array:
    """y = A x over the sequence axis: x [B, n, d] with A [n, n] or x [B, n, H, K] with A [H, n, n];
    a kernel A (trailing tap axis, A.ndim == x.ndim) contracts the feature-shifted copies of x."""
    headed = x.ndim == 4
    if a.ndim == x.ndim:
        return (headed_kernel_mix if headed else kernel_mix)(a, x)
    return (headed_dense_mix if headed else dense_mix)(a, x)


def mix_parallel(p: dict, x: Array, s: MixingSpec) -> Array:
    """The parallel form of one mixing matrix (no bias) with implementation ``s.impl``."""
    op = s.op
    if s.impl not in op.impls:
        raise ValueError(f"{s.mixing!r} mixing has only the implementations {op.impls}, got {s.impl!r}")
    if not s.causal and not op.unmasked:
        raise ValueError(f"{s.mixing!r} mixing is causal only (no unmasked form)")
    if s.impl == "fft":
        return op.fft(p, x, s)
    return apply_matrix(op.matrix(p, s), x)


def mix_cached_step(p: dict, cache_x: Array, pos: Array, s: MixingSpec) -> Array:
    """Step form from the cached inputs x_{≤pos} [B, n, d | H, K]: row ``pos`` of A dotted with
    them (one row per tap for kernel mixing)."""
    row = s.op.row(p, pos, s)
    return (cached_kernel_step if s.kernel > 1 else cached_mix_step)(row, cache_x)


def causal_mix(
    x: Array,
    *,
    mixing: str,
    c: Array,
    w: Array | None = None,
    v: Array | None = None,
    lam: Array | None = None,
    decay: bool = True,
    impl: str = "dense",
    mask_grad: str = "masked",
    causal: bool = True,
) -> Array:
    """One mixing matrix applied to x [B,N,D] (w_NxN / v_N) or x [B,N,H,K] (w_HxNxN / v_HxN),
    plus the per-position bias c (see :data:`MIXING_OPS`). A flat ``w`` with a trailing tap axis
    ([.., n, n, k]) is kernel mixing (docs/masked_mixers.md#kernel-mixing), masked per tap.
    ``causal=False``: unmasked mixing."""
    if mixing not in MIXING_OPS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    weight = w if MIXING_OPS[mixing].weight == "w" else v
    heads = weight.shape[0] if x.ndim == 4 else 0
    kernel = weight.shape[-1] if weight.ndim == x.ndim else 1
    s = MixingSpec(n_ctx=x.shape[1], d_model=x.shape[-1], mixing=mixing, heads=heads, impl=impl,
                   mask_grad=mask_grad, decay=decay, kernel=kernel, causal=causal)
    p = {MIXING_OPS[mixing].weight: weight, "c": c, "lam": lam}
    return add_position_bias(mix_parallel(p, x, s), c)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class TokenMixing(nn.Module):
    """Causal token mixing x [B, n, d] -> [B, n, d] (docs/masked_mixers.md, docs/recurrent_mixers.md),
    one op of
    :data:`MIXING_OPS`.

    heads == 0: one matrix shared by all d features, no projections.
    heads == H ≥ 1: per-head projection d -> d/H (bias), a per-head matrix and bias, concatenation
    and an output projection d -> d (bias); no nonlinearity.
    expanded: mix -> GELU -> mix (both causal, factor 1), inside each head when headed.
    kernel = k > 1 (flat only): ``Conv1d(n, n, k)`` with positions as channels, sliding along the
    features (of each head when headed) with "same" padding,
    masked per tap (docs/masked_mixers.md#kernel-mixing).
    causal = False: unmasked (bidirectional) flat / kernel / Toeplitz mixing; no step form.

    Parameters (leading 'heads' axis only when headed; created in this order: weight, c, lam):
      flat:      w [H?, n, n] ('heads', 'seq_out', 'seq_in'), c [H?, n] ('heads', 'seq_out')
      kernel:    w [H?, n, n, k] ('heads', 'seq_out', 'seq_in', None) = Conv1d weight
                 [out position i, in position j, tap τ]; c [H?, n]
      toeplitz:  v [H?, n]    ('heads', 'seq_in'),            c [H?, n]
                 causal=False: v [H?, 2n−1] two-sided, T_ij = v_{i−j+n−1} (v_{n−1}: current token)
      row / col / mixed (structured recurrent, docs/recurrent_mixers.md):
                 v [H?, n] ('heads', 'seq_in'), c [H?, n], lam [H?] ('heads') — the decay λ,
                 initialised to 1 and used as clip(λ, 0.9, 1)^(1/κ) (``decay=False``: δ = 1)
      expanded:  w1/v1, c1, w2/v2, c2 instead of w/v, c (lam1, lam2 for structured mixing)
      headed:    proj/kernel [d, H, d/H] ('embed', 'heads', 'head_dim'), proj/bias [H, d/H],
                 out/kernel [H, d/H, d] ('heads', 'head_dim', 'embed'), out/bias [d]

    All hyper-parameters are in ``spec`` (:class:`MixingSpec`).

    Call forms:
      ``mix(x_BxNxD)`` -> y_BxNxD, the parallel form;
      ``mix(x_BxD, pos=i, cache=cache)`` -> (y_BxD, new cache), the step form at position i (a
      scalar, the same for every row). ``cache`` comes from :meth:`init_cache`: mode 'cached' keeps
      the mixing inputs of every position (``x<suffix>`` [B, n, d] or [B, n, H, d/H]; O(n·d));
      mode 'recurrent' (ops with a recurrent form) keeps the O(d) state ``s<suffix>`` (float32).
    """

    spec: MixingSpec

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("1", "2") if self.spec.expanded else ("",)

    @nn.nowrap
    def init_cache(self, batch: int, mode: str = "cached") -> dict:
        """Zero cache/state for :meth:`__call__`'s step form."""
        if not self.spec.causal:
            raise ValueError(
                "unmasked (causal=False) token mixing has no step form: every output depends on "
                "later positions"
            )
        spec = self.spec
        n, d, h = spec.n_ctx, spec.d_model, spec.heads
        feat = (h, d // h) if h else (d,)
        if mode == "cached":
            return {"x" + s: jnp.zeros((batch, n) + feat, spec.dtype) for s in self.suffixes}
        if mode == "recurrent":
            if spec.op.recurrent is None:
                raise ValueError(
                    f"'recurrent' needs structured mixing {SRM_MIXINGS}; {spec.mixing!r} has no "
                    "O(1) recurrence (use mode 'cached')"
                )
            return {"s" + s: jnp.zeros((batch,) + feat, jnp.float32) for s in self.suffixes}
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")

    def _matrix(self, suffix: str) -> dict:
        s, op, h = self.spec, self.spec.op, self.spec.heads
        head_shape, head_axes = ((h,), ("heads",)) if h else ((), ())
        w_init, c_init = mixing_inits(s)
        shape, axes = op.weight_shape(s)
        out = {op.weight: self.param(op.weight + suffix,
                                     nn.with_logical_partitioning(w_init, head_axes + axes),
                                     head_shape + shape, jnp.float32)}
        out["c"] = self.param("c" + suffix,
                              nn.with_logical_partitioning(c_init, head_axes + ("seq_out",)),
                              head_shape + (s.n_ctx,), jnp.float32)
        if op.decay:
            out["lam"] = self.param("lam" + suffix,
                                    nn.with_logical_partitioning(layers.ones, head_axes),
                                    head_shape, jnp.float32)
        return out

    def _mix(self, z: Array, suffix: str) -> Array:
        p = self._matrix(suffix)
        return add_position_bias(mix_parallel(p, z, self.spec), p["c"])

    def _mix_step(self, z: Array, suffix: str, pos: Array, cache: dict) -> tuple[Array, dict]:
        """Step form of :meth:`_mix` for z [B, d] or [B, H, K] at position ``pos``."""
        if not self.spec.causal:
            raise ValueError("unmasked (causal=False) token mixing has no step form")
        p, s = self._matrix(suffix), self.spec
        cache = dict(cache)
        if "s" + suffix in cache:  # O(1) recurrence
            y, cache["s" + suffix] = s.op.recurrent(cache["s" + suffix], z, p, pos, s)
            y = y.astype(z.dtype)
        else:  # cache of the mixing inputs, one matrix row
            cache["x" + suffix] = jax.lax.dynamic_update_index_in_dim(
                cache["x" + suffix], z.astype(self.spec.dtype), pos, axis=1)
            y = mix_cached_step(p, cache["x" + suffix], pos, s)
        y = y + position_bias_at(p["c"], pos).astype(y.dtype)
        return y, cache

    @nn.compact
    def __call__(self, x: Array, pos: Array | None = None, cache: dict | None = None):
        spec = self.spec
        n, d, h = spec.n_ctx, spec.d_model, spec.heads
        step = cache is not None
        if not step and x.shape[1] != n:
            raise ValueError(f"token mixing expects {n} positions, got {x.shape[1]}")
        if spec.kernel > 1 and not spec.op.kernel:
            raise ValueError(f"kernel > 1 is not available for {spec.mixing!r} mixing")
        x = x.astype(spec.dtype)
        k_init, b_init = layers.linear_inits(spec.reference, d, spec.kaiming)

        def linear(features, axes, name, n_in=1):
            return layers.Linear(features, axes, n_in=n_in, kernel_init=k_init, bias_init=b_init,
                                 dtype=spec.dtype, name=name)

        z = x
        if h:
            z = linear((h, d // h), ("embed", "heads", "head_dim"), "proj")(x)
            if not step:
                z = nn.with_logical_constraint(z, ("batch", "length", "act_heads", None))
        for i, suffix in enumerate(self.suffixes):
            if i:
                z = layers.gelu(z, spec.reference)
            if step:
                z, cache = self._mix_step(z, suffix, pos, cache)
            else:
                z = self._mix(z, suffix)
        if h:
            z = linear((d,), ("heads", "head_dim", "embed"), "out", n_in=2)(z)
        return (z, cache) if step else z
