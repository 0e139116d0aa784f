"""Block-triangular causal mixing: y = (W ⊙ M) x on the lower block triangle only
(docs/mixing_performance.md#block-triangular-mixing).

Split the n positions into blocks of b (the last one may be shorter), I = [s_I, e_I). Row block I
of the output reads only the inputs 0 .. e_I − 1, so

    y_I = (W[I, :e_I] ⊙ M_I) x[:e_I]                          (forward)
    dx_J = (W[s_J:, J] ⊙ M)ᵀ dy[s_J:]                          (input gradient)
    dW[I, :e_I] = (dy_I x[:e_I]ᵀ) ⊙ M_I,  0 above the blocks   (mask_grad 'masked')
    dW = dy xᵀ over all n × n                                   (mask_grad 'straight_through')

where M_I is the causal mask restricted to the slice (only its diagonal b × b block has zeros).
Every product is one matmul over a contiguous slice, and the work is (1 + b/n)/2 of the dense
n × n product (exact for n a multiple of b) for the forward, the input gradient and the masked
weight gradient; straight-through keeps the full weight gradient, since its upper triangle gets
the unmasked gradient dy xᵀ.

Canonical layout: w [G, n, n] (G = 1 flat, H headed) and x [G, n, F] with F the batch and the
features flattened together (positions leading, so row blocks are contiguous); :func:`to_groups`
and :func:`from_groups` convert from and to the model's x [B, n, d] / [B, n, H, K]. The products
run in x's dtype (W cast to it, as the dense form does); gradients come back in the inputs'
dtypes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# 'auto' picks the blocked form from this context length on (measured on 2 CPU cores,
# docs/mixing_performance.md#when-it-is-chosen).
BLOCKED_MIN_N = 128


def block_size(n: int) -> int:
    """The block b of the blocked form at context length n: 64 below n = 256, else n/4 rounded up
    to a multiple of 128 (at least 128), i.e. 2 to 4 row blocks, which measured fastest (more,
    smaller blocks lose to their per-matmul overhead and copies); always a multiple of 16."""
    if n < 256:
        return 64
    return max(128, -(-n // (4 * 128)) * 128)


def block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """[(s_I, e_I)] of the row blocks: [0, b), [b, 2b), ..., the last one ending at n."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def blocked_work_fraction(n: int, block: int) -> float:
    """Multiply-adds of the blocked product / those of the dense n × n one: Σ_I |I|·e_I / n²."""
    return sum((e - s) * e for s, e in block_bounds(n, block)) / float(n * n)


def causal_slice_mask(row0: int, rows: int, col0: int, cols: int) -> Array:
    """bool [rows, cols]: the causal mask (column ≤ row) of W[row0:row0+rows, col0:col0+cols]."""
    r = row0 + jnp.arange(rows)[:, None]
    c = col0 + jnp.arange(cols)[None, :]
    return c <= r


def to_groups(x: Array) -> Array:
    """x [B, n, d] -> [1, n, B·d]; x [B, n, H, K] -> [H, n, B·K]."""
    if x.ndim == 3:
        b, n, d = x.shape
        return jnp.transpose(x, (1, 0, 2)).reshape(1, n, b * d)
    b, n, h, k = x.shape
    return jnp.transpose(x, (2, 1, 0, 3)).reshape(h, n, b * k)


def from_groups(y_GxNxF: Array, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`to_groups` for an x of ``shape``."""
    if len(shape) == 3:
        b, n, d = shape
        return jnp.transpose(y_GxNxF.reshape(n, b, d), (1, 0, 2))
    b, n, h, k = shape
    return jnp.transpose(y_GxNxF.reshape(h, n, b, k), (2, 1, 0, 3))


def _masked(w: Array, row0: int, rows: int, col0: int, cols: int) -> Array:
    mask = causal_slice_mask(row0, rows, col0, cols)
    return jnp.where(mask, w, jnp.zeros_like(w))


def _forward(w_GxNxN: Array, x_GxNxF: Array, block: int) -> Array:
    n = x_GxNxF.shape[1]
    w = w_GxNxN.astype(x_GxNxF.dtype)
    ys = []
    for s, e in block_bounds(n, block):
        a = _masked(w[:, s:e, :e], s, e - s, 0, e)
        ys.append(jnp.einsum("gij,gjf->gif", a, x_GxNxF[:, :e]))
    return jnp.concatenate(ys, axis=1)


def blocked_grads(w_GxNxN: Array, x_GxNxF: Array, dy_GxNxF: Array, block: int,
                  upper_grad: bool) -> tuple[Array, Array]:
    """(dW, dx) of y = (W ⊙ M) x for the output gradient dy, on the block triangle (dW's upper
    triangle: 0, or dy xᵀ when ``upper_grad``, the straight-through gradient)."""
    n = x_GxNxF.shape[1]
    dtype = x_GxNxF.dtype
    w = w_GxNxN.astype(dtype)
    dy = dy_GxNxF.astype(dtype)
    bounds = block_bounds(n, block)
    dxs = []
    for s, e in bounds:  # column block J = [s, e): rows s .. n−1 read it
        a = _masked(w[:, s:, s:e], s, n - s, s, e - s)
        dxs.append(jnp.einsum("gij,gif->gjf", a, dy[:, s:]))
    dx = jnp.concatenate(dxs, axis=1)
    if upper_grad:
        dw = jnp.einsum("gif,gjf->gij", dy, x_GxNxF)
    else:
        rows = []
        for s, e in bounds:
            g = _masked(jnp.einsum("gif,gjf->gij", dy[:, s:e], x_GxNxF[:, :e]), s, e - s, 0, e)
            rows.append(jnp.pad(g, ((0, 0), (0, 0), (0, n - e))))
        dw = jnp.concatenate(rows, axis=1)
    return dw.astype(w_GxNxN.dtype), dx.astype(x_GxNxF.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def blocked_causal_mix(w_GxNxN: Array, x_GxNxF: Array, block: int, upper_grad: bool = False) -> Array:
    """y = (W ⊙ M) x per group, computed on the lower block triangle (blocks of ``block``).

    ``upper_grad=False``: dW is masked (mask_grad 'masked'); True: dW's upper triangle gets the
    unmasked gradient (mask_grad 'straight_through'). The value is the same either way."""
    return _forward(w_GxNxN, x_GxNxF, block)


def _fwd(w_GxNxN, x_GxNxF, block, upper_grad):
    return _forward(w_GxNxN, x_GxNxF, block), (w_GxNxN, x_GxNxF)


def _bwd(block, upper_grad, residuals, dy_GxNxF):
    w_GxNxN, x_GxNxF = residuals
    return blocked_grads(w_GxNxN, x_GxNxF, dy_GxNxF, block, upper_grad)


blocked_causal_mix.defvjp(_fwd, _bwd)


def blocked_mix(w: Array, x: Array, block: int, upper_grad: bool = False) -> Array:
    """The blocked causal product in the model's layout: w [n, n] with x [B, n, d], or w [H, n, n]
    with x [B, n, H, K] (no bias)."""
    w_GxNxN = w[None] if w.ndim == 2 else w
    y = blocked_causal_mix(w_GxNxN, to_groups(x), block, upper_grad)
    return from_groups(y, x.shape)
