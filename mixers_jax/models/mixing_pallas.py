"""A Pallas kernel for causal mixing with the bias fused: y = (W ⊙ M) x + c
(docs/mixing_performance.md#pallas-kernel).

Grid (G, n/b, F/f): program (g, i, k) computes the output tile rows [i·b, (i+1)·b) × features
[k·f, (k+1)·f) of group g as Σ_{j ≤ i} (W_ij ⊙ M) x_j over the column blocks j = 0 .. i only (the
diagonal block masked, the blocks above never read), accumulates in float32, adds the bias c_i
and writes the tile once. The row block of W ([b, n]) and the feature column of x ([n, f]) are
refs; the loop loads one [b, b] and one [b, f] block per step. Block sizes are multiples of 16
and powers of two (what the GPU (Triton) lowering needs); n and F are zero-padded up to them
outside the kernel.

The backward pass is :func:`mixing_blocked.blocked_grads` (XLA matmuls on the block triangle)
plus dc = Σ over the batch and features of dy, through ``jax.custom_vjp``.

On CPU there is no Pallas compiler: the kernel runs in interpret mode (``interpret=True``,
chosen from the default backend), which is exact but slow; it is for testing the kernel, and
``mixing_impl='auto'`` never picks it. It has not been run on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mixers_jax.models.mixing_blocked import blocked_grads, from_groups, to_groups

Array = jax.Array

FEATURE_BLOCK = 64  # f: feature columns per program
MAX_BLOCK = 128  # b: rows and columns of a W tile (registers / shared memory on a GPU)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _pow2_at_least(v: int, floor: int = 16) -> int:
    return max(floor, 1 << (v - 1).bit_length())


def kernel_blocks(n: int, f: int, block: int) -> tuple[int, int]:
    """(b, f) of the kernel: the row/column block (a power of two ≥ 16, at most ``block``, n and
    :data:`MAX_BLOCK` rounded up to powers of two) and the feature tile (a power of two ≥ 16, at
    most :data:`FEATURE_BLOCK`)."""
    b = min(_pow2_at_least(block), _pow2_at_least(n), MAX_BLOCK)
    return b, min(FEATURE_BLOCK, _pow2_at_least(f))


def _mix_kernel(w_ref, x_ref, c_ref, o_ref, *, block: int):
    """One output tile: Σ_{j ≤ i} (W_ij ⊙ M) x_j + c_i (refs: w [b, N], x [N, f], c [b], o [b, f])."""
    i = pl.program_id(1)
    rows = i * block + jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    cols0 = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)

    def body(j, acc):
        start = pl.multiple_of(j * block, block)
        w = w_ref[:, pl.ds(start, block)]
        x = x_ref[pl.ds(start, block), :]
        w = jnp.where(cols0 + j * block <= rows, w, jnp.zeros_like(w)).astype(x.dtype)
        return acc + jnp.dot(w, x, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, i + 1, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc + c_ref[...].astype(jnp.float32)[:, None]).astype(o_ref.dtype)


def pallas_causal_mix_groups(w_GxNxN: Array, x_GxNxF: Array, c_GxN: Array, block: int,
                             interpret: bool | None = None) -> Array:
    """(W ⊙ M) x + c per group by the kernel (no custom gradient: see :func:`pallas_mix`)."""
    g, n, f = x_GxNxF.shape
    b, bf = kernel_blocks(n, f, block)
    n_pad, f_pad = _round_up(n, b), _round_up(f, bf)
    w = jnp.pad(w_GxNxN, ((0, 0), (0, n_pad - n), (0, n_pad - n)))
    x = jnp.pad(x_GxNxF, ((0, 0), (0, n_pad - n), (0, f_pad - f)))
    c = jnp.pad(c_GxN, ((0, 0), (0, n_pad - n)))
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    y = pl.pallas_call(
        functools.partial(_mix_kernel, block=b),
        out_shape=jax.ShapeDtypeStruct((g, n_pad, f_pad), x.dtype),
        grid=(g, n_pad // b, f_pad // bf),
        in_specs=[
            pl.BlockSpec((None, b, n_pad), lambda gi, i, k: (gi, i, 0)),
            pl.BlockSpec((None, n_pad, bf), lambda gi, i, k: (gi, 0, k)),
            pl.BlockSpec((None, b), lambda gi, i, k: (gi, i)),
        ],
        out_specs=pl.BlockSpec((None, b, bf), lambda gi, i, k: (gi, i, k)),
        interpret=interpret,
        name="causal_mix",
    )(w, x, c)
    return y[:, :n, :f]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_mix_groups(w_GxNxN, x_GxNxF, c_GxN, block, upper_grad):
    return pallas_causal_mix_groups(w_GxNxN, x_GxNxF, c_GxN, block)


def _fwd(w_GxNxN, x_GxNxF, c_GxN, block, upper_grad):
    y = pallas_causal_mix_groups(w_GxNxN, x_GxNxF, c_GxN, block)
    return y, (w_GxNxN, x_GxNxF, c_GxN)


def _bwd(block, upper_grad, residuals, dy_GxNxF):
    w_GxNxN, x_GxNxF, c_GxN = residuals
    dw, dx = blocked_grads(w_GxNxN, x_GxNxF, dy_GxNxF, block, upper_grad)
    dc = jnp.sum(dy_GxNxF.astype(jnp.float32), axis=2).astype(c_GxN.dtype)
    return dw, dx, dc


_pallas_mix_groups.defvjp(_fwd, _bwd)


def pallas_mix(w: Array, x: Array, c: Array, block: int, upper_grad: bool = False) -> Array:
    """(W ⊙ M) x + c by the kernel in the model's layout: w [n, n], c [n] with x [B, n, d], or
    w [H, n, n], c [H, n] with x [B, n, H, K]; gradients by the blocked XLA form."""
    w_GxNxN = w[None] if w.ndim == 2 else w
    c_GxN = c[None] if c.ndim == 1 else c
    y = _pallas_mix_groups(w_GxNxN, to_groups(x), c_GxN, block, upper_grad)
    return from_groups(y, x.shape)
