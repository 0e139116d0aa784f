"""Token-mixing ops: the table of ops and the Flax module that owns their parameters
(docs/masked_mixers.md).

The math (parallel and step forms, masks, Toeplitz and structured matrices, FFT) is
:mod:`mixers_jax.models.mixing_math`; this module holds

* **the table of mixing ops**, :data:`MIXING_OPS`: one frozen :class:`MixingOp` per op ('flat',
  'toeplitz', 'row', 'col', 'mixed') with its weight (name, shape, logical axes) and inits, its
  effective n×n matrix as a function of its parameters (causal and unmasked), the row of that
  matrix for the cached step form, its O(d)-state recurrent step (if any), its FFT implementation
  (if any), its forward FLOPs per token, and its constraints (kernel taps, unmasked form,
  straight-through mask gradient, minimum heads; :func:`check_mixing` raises the ``UserError``
  that ``build_model`` reports; :func:`resolve_impl` turns ``mixing_impl='auto'`` into an
  implementation). The models, ``flops.py``, ``inspect.py`` (effective matrices) and
  ``generate.py`` (which step modes exist) read the table; nothing else compares op names.
  **Adding a mixing op** = one entry in :data:`MIXING_OPS` (plus its math functions in ``mixing_math``) and
  one line in the ``VARIANTS`` of ``tests/test_step_forms.py`` (its step forms must equal its
  parallel form; ``tests/test_inspect.py`` checks its matrix against the layer's Jacobian by
  itself, for every entry of the table).
* ``TokenMixing``: the Flax module owning the parameters (W or v, bias c, optional per-head
  projections), configured by one :class:`MixingSpec`; the op and ``impl`` choose the
  computation: 'dense' (the masked n×n matmul), 'blocked' (the lower block triangle only,
  :mod:`mixers_jax.models.mixing_blocked`), 'pallas' (a Pallas kernel with the bias fused,
  :mod:`mixers_jax.models.mixing_pallas`), 'fft' (Toeplitz); all give the same values and
  gradients up to float reassociation (docs/mixing_performance.md).

Initialisation (``reference`` flag, docs/training.md#initialisation):

* reference=True (PyTorch defaults of the published models): flat W, c ~ U(±1/√n) (Conv1d(n, n, 1),
  fan_in = n); Toeplitz v ~ N(0, 1), c = 0.
* reference=False (our choice): flat W_ij ~ N(0, 1/(i+1)), i.e. variance-preserving for each output
  row given its i+1 causal inputs (the upper triangle is drawn too but never used); Toeplitz
  v ~ N(0, 1/n), so the last row (which sums all n taps) has unit gain and earlier rows less; c = 0.
* kernel k > 1: fan_in n·k (U(±1/√(n·k)); N(0, 1/((i+1)·k))); unmasked flat with reference=False:
  N(0, 1/(n·k)). A two-sided Toeplitz v has the causal v's init.

``init`` overrides these (the token mixing of a transformer-mixer hybrid, ``model.hybrid_mix_init``,
docs/transformer_baseline.md#hybrid-initialisation): 'small' draws every mixing matrix's weight
(w or v) N(0, init_std²) and its bias c = 0; 'zero' sets the last linear map of the mixing to zero
(the last matrix w/v and c, or the output projection ``out`` when headed), so the mixing starts as
a zero residual branch whose weights still get gradients. Projections, λ and an expanded mixing's
first matrix keep their init under 'zero'.
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
from mixers_jax.models.mixing_blocked import (
    BLOCKED_MIN_N, block_size, blocked_mix, blocked_work_fraction)
from mixers_jax.models.mixing_pallas import pallas_mix
from mixers_jax.models.mixing_math import (
    row_scaled_normal, row_scaled_kernel_normal, kaiming_inits,
    mask_weight, dense_mix, headed_dense_mix, add_position_bias, kernel_mix, headed_kernel_mix,
    toeplitz_matrix, toeplitz_mix_fft, headed_toeplitz_mix_fft, toeplitz_matrix_two_sided,
    toeplitz_two_sided_fft, srm_delta, srm_is_col, srm_matrix, srm_matrix_row, srm_step,
    flat_matrix_row, toeplitz_matrix_row, cached_mix_step, kernel_matrix_row,
    cached_kernel_step, position_bias_at, MASK_GRADS)

Array = jax.Array
Dtype = Any

CACHE_MODES = ("cached", "recurrent")


# ---------------------------------------------------------------------------------------------
# Initialisers for the mixing parameters
# ---------------------------------------------------------------------------------------------


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
    causal or unmasked, compute dtype, initialisation override (``init``, ``init_std``)."""

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
    init: str = "op"  # 'op' (the inits above) | 'small' (N(0, init_std²), c = 0) | 'zero'
    init_std: float = 0.002

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
    per token of one matrix over d features (flops.py conventions: the work the implementation
    does); causal_weight(p, s) -> the matrix the 'blocked' and 'pallas' forms multiply, masking it
    themselves (flat: W itself, so that they never touch its upper triangle; default: the causal
    ``matrix``). Constraints: ``kernel`` (k > 1
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
    causal_weight: Callable[[dict, MixingSpec], Array] | None = None
    recurrent: Callable | None = None
    decay: bool = False
    kernel: bool = False
    unmasked: bool = True
    straight_through: bool = False
    min_heads: int = 0

    @property
    def impls(self) -> tuple[str, ...]:
        return ("dense",) + BLOCK_IMPLS + (("fft",) if self.fft is not None else ())

    def weight_for_blocks(self, p: dict, s: MixingSpec) -> Array:
        """The matrix the 'blocked' / 'pallas' forms multiply (they mask it themselves)."""
        return (self.causal_weight or self.matrix)(p, s)


# Implementations that multiply the lower block triangle only (causal, k = 1).
BLOCK_IMPLS = ("blocked", "pallas")


def dense_flops_per_token(s: MixingSpec, d: int) -> float:
    """The materialised product (k feature-shifted copies for kernel mixing): k·n·d multiply-adds;
    the block-triangular forms: the fraction of it they compute (mixing_blocked)."""
    full = 2.0 * s.n_ctx * d * s.kernel
    if s.impl in BLOCK_IMPLS:
        return full * blocked_work_fraction(s.n_ctx, block_size(s.n_ctx))
    return full


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
                     causal_weight=lambda p, s: p["w"], kernel=True, straight_through=True),
    "toeplitz": MixingOp(name="toeplitz", weight="v", weight_shape=_toeplitz_shape,
                         inits=_toeplitz_inits, matrix=_toeplitz_matrix, row=_toeplitz_row,
                         flops_per_token=_toeplitz_flops, fft=_toeplitz_fft),
    "row": _structured("row"),
    "col": _structured("col"),
    "mixed": _structured("mixed", min_heads=2),  # heads 0..H/2−1 column-, the rest row-repeat
}
MIXINGS = tuple(MIXING_OPS)
SRM_MIXINGS = tuple(name for name, op in MIXING_OPS.items() if op.recurrent is not None)
IMPLS = ("auto",) + tuple(dict.fromkeys(impl for op in MIXING_OPS.values() for impl in op.impls))


def resolve_impl(impl: str, n_ctx: int, kernel: int = 1, causal: bool = True) -> str:
    """The implementation ``mixing_impl`` stands for: 'auto' is 'blocked' for causal mixing with
    k = 1 from n_ctx = ``BLOCKED_MIN_N`` on (where it measured faster on CPU,
    docs/mixing_performance.md#when-it-is-chosen), else 'dense'; other values are themselves. A function
    of the shapes only, so the same config always computes the same way."""
    if impl != "auto":
        return impl
    return "blocked" if causal and kernel == 1 and n_ctx >= BLOCKED_MIN_N else "dense"


def check_mixing(mixing: Any, impl: Any, mask_grad: Any, heads: Any, kernel: Any, causal: Any) -> None:
    """Raises ``UserError`` (naming the ``model.`` field) unless the table allows the combination."""
    if mixing not in MIXING_OPS:
        raise UserError(f"model.mixing must be one of {MIXINGS}, got {mixing!r}")
    op = MIXING_OPS[mixing]
    if impl not in IMPLS:
        raise UserError(f"model.mixing_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" and impl not in op.impls:
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
    if impl in BLOCK_IMPLS and (not causal or kernel != 1):
        raise UserError(f"model.mixing_impl={impl!r} needs causal mixing with model.kernel=1 "
                        "(use 'dense' or 'auto')")


def mixing_inits(spec: MixingSpec, last: bool = True) -> tuple[Callable, Callable]:
    """(weight init, bias init) of one matrix: the op's, or Kaiming with fan_in = n·k in the SRM
    block (``spec.kaiming``); ``spec.init`` 'small': N(0, init_std²) and zeros; 'zero': zeros for
    the ``last`` matrix of an unheaded mixing (headed: its output projection is zeroed instead)."""
    if spec.init == "small":
        return layers.normal(spec.init_std), layers.zeros
    if spec.init == "zero" and last and not spec.heads:
        return layers.zeros, layers.zeros
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


def _check_parallel(s: MixingSpec) -> None:
    op = s.op
    if s.impl not in op.impls:
        raise ValueError(f"{s.mixing!r} mixing has only the implementations {op.impls}, got {s.impl!r}")
    if not s.causal and not op.unmasked:
        raise ValueError(f"{s.mixing!r} mixing is causal only (no unmasked form)")
    if s.impl in BLOCK_IMPLS and (not s.causal or s.kernel != 1):
        raise ValueError(f"mixing impl {s.impl!r} needs causal mixing with kernel 1")


def mix_parallel(p: dict, x: Array, s: MixingSpec) -> Array:
    """The parallel form of one mixing matrix (no bias) with implementation ``s.impl`` ('pallas':
    see :func:`mix_parallel_with_bias`)."""
    _check_parallel(s)
    op = s.op
    if s.impl == "fft":
        return op.fft(p, x, s)
    if s.impl in BLOCK_IMPLS:
        return blocked_mix(op.weight_for_blocks(p, s), x, block_size(s.n_ctx),
                           upper_grad=s.mask_grad == "straight_through")
    return apply_matrix(op.matrix(p, s), x)


def mix_parallel_with_bias(p: dict, x: Array, s: MixingSpec) -> Array:
    """One mixing matrix and its per-position bias c: y = A x + c. 'pallas' fuses the bias into
    the kernel; the other implementations add it after the product."""
    if s.impl == "pallas":
        _check_parallel(s)
        return pallas_mix(s.op.weight_for_blocks(p, s), x, p["c"], block_size(s.n_ctx),
                          upper_grad=s.mask_grad == "straight_through")
    return add_position_bias(mix_parallel(p, x, s), p["c"])


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
    ``causal=False``: unmasked mixing. ``impl``: any ``mixing_impl`` ('auto': :func:`resolve_impl`)."""
    if mixing not in MIXING_OPS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    weight = w if MIXING_OPS[mixing].weight == "w" else v
    heads = weight.shape[0] if x.ndim == 4 else 0
    kernel = weight.shape[-1] if weight.ndim == x.ndim else 1
    impl = resolve_impl(impl, x.shape[1], kernel, causal)
    s = MixingSpec(n_ctx=x.shape[1], d_model=x.shape[-1], mixing=mixing, heads=heads, impl=impl,
                   mask_grad=mask_grad, decay=decay, kernel=kernel, causal=causal)
    p = {MIXING_OPS[mixing].weight: weight, "c": c, "lam": lam}
    return mix_parallel_with_bias(p, x, s)


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
        w_init, c_init = mixing_inits(s, last=suffix == self.suffixes[-1])
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
        return mix_parallel_with_bias(self._matrix(suffix), z, self.spec)

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
    def __call__(self, x: Array, pos: Array | None = None, cache: dict | None = None,
                 keep_BxN: Array | None = None):
        """Parallel form ``x [B, n, d]`` -> [B, n, d]; step form with ``pos`` and ``cache``.
        ``keep_BxN`` (parallel form only; 1 = real token, 0 = pad) zeroes the input of every mixing
        matrix at the pad positions, i.e. y_i = Σ_j W_ij·keep_j·z_j + c_i: pads contribute nothing
        to any position (docs/retrieval.md#padding-and-the-embedding-position)."""
        spec = self.spec
        n, d, h = spec.n_ctx, spec.d_model, spec.heads
        step = cache is not None
        if not step and x.shape[1] != n:
            raise ValueError(f"token mixing expects {n} positions, got {x.shape[1]}")
        if spec.kernel > 1 and not spec.op.kernel:
            raise ValueError(f"kernel > 1 is not available for {spec.mixing!r} mixing")
        x = x.astype(spec.dtype)
        k_init, b_init = layers.linear_inits(spec.reference, d, spec.kaiming)

        def linear(features, axes, name, n_in=1, zero=False):
            return layers.Linear(features, axes, n_in=n_in, kernel_init=layers.zeros if zero else k_init,
                                 bias_init=layers.zeros if zero else b_init,
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
                if keep_BxN is not None:
                    z = z * keep_BxN.reshape(keep_BxN.shape + (1,) * (z.ndim - 2)).astype(z.dtype)
                z = self._mix(z, suffix)
        if h:
            z = linear((d,), ("heads", "head_dim", "embed"), "out", n_in=2,
                       zero=spec.init == "zero")(z)  # 'zero': the output projection starts at 0
        return (z, cache) if step else z
