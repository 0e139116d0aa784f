"""Building blocks shared by every model: initializers, linears, embeddings, norms, MLPs.

Every parameter is created through ``nn.with_logical_partitioning(init, names)`` with names from
``LOGICAL_AXES``; the sharding rules (``mixers_jax/sharding.py``) map them onto mesh axes.

Numerics (docs/training.md#reference-numerics): with ``reference=True``
the layers reproduce the published PyTorch models
(LayerNorm eps 1e-5, exact-erf GELU, PyTorch-default inits); with ``reference=False`` GELU is the
tanh approximation and linears/embeddings are drawn from N(0, 0.02²) with zero biases.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixers_jax.errors import UserError

Array = jax.Array
Dtype = Any
Init = Callable[..., Array]

# The only logical axis names a parameter may carry ("layers": the stacked axis of scanned blocks).
LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "head_dim", "seq_out", "seq_in", "norm", "layers")

LAYER_NORM_EPS = 1e-5  # docs/training.md#reference-numerics (PyTorch default; Flax's default is 1e-6)
RMS_NORM_EPS = 1e-6  # Llama (docs/transformer_baseline.md#architecture)


def dtype_of(name: str | Dtype) -> Dtype:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
    if isinstance(name, str):
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    return name


# ---------------------------------------------------------------------------------------------
# Initializers
# ---------------------------------------------------------------------------------------------


def leading_axes(a: Array, ndim: int) -> Array:
    """``a`` with size-1 axes prepended up to ``ndim`` axes: an explicit broadcast against a
    rank-``ndim`` array (the package runs with ``jax_numpy_rank_promotion='raise'``)."""
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def uniform_fan_in(fan_in: int) -> Init:
    """PyTorch's Linear/Conv default: U(-1/sqrt(fan_in), +1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float) -> Init:
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def linear_inits(reference: bool, fan_in: int, kaiming: bool = False) -> tuple[Init, Init]:
    """(kernel_init, bias_init): PyTorch defaults if ``reference`` else N(0, 0.02²) and zeros;
    ``kaiming`` (SRM models, docs/training.md#initialisation): N(0, 2/fan_in) and zeros."""
    if kaiming:
        return normal(math.sqrt(2.0 / fan_in)), zeros
    if reference:
        return uniform_fan_in(fan_in), uniform_fan_in(fan_in)
    return normal(0.02), zeros


def gelu(x: Array, reference: bool) -> Array:
    """Exact erf GELU for the reference numerics, the tanh approximation otherwise."""
    return nn.gelu(x, approximate=not reference)


def dropout(module: nn.Module, x: Array, rate: float) -> Array:
    """Inverted dropout: x·m/(1−p), m ~ Bernoulli(1−p) elementwise, drawn from ``module``'s
    'dropout' RNG stream. Identity (no RNG drawn) when p = 0 or when the apply has no 'dropout'
    RNG (evaluation, generation, step forms): only the train step passes one."""
    if rate == 0.0 or not module.has_rng("dropout"):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x·K (+ b), contracting the last ``n_in`` axes of x with the first ``n_in`` of K.

    The kernel has shape ``x.shape[-n_in:] + out_shape`` and logical names ``kernel_axes``; the
    bias has shape ``out_shape`` and the trailing ``len(out_shape)`` names (or ``bias_axes``).
    E.g. a headed projection d -> (H, d/H) has kernel ('embed', 'heads', 'head_dim').

    ``gather_kernel`` reads the whole (replicated) kernel where it is used: the all-gather FSDP does
    for every weight, made explicit, so that x keeps its batch-split rows; for the small [B, d]
    vectors of the bottleneck, which the SPMD partitioner would otherwise split along the width to
    meet a width-split kernel, a move it can only make by replicating them.
    """

    out_shape: Sequence[int]
    kernel_axes: Sequence[str]
    use_bias: bool = True
    n_in: int = 1
    kernel_init: Init = normal(0.02)
    bias_init: Init = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bias_axes: Sequence[str] | None = None
    out_dtype: Dtype | None = None  # e.g. float32 for logits computed from bf16 operands
    gather_kernel: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_shape = tuple(self.out_shape)
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            in_shape + out_shape,
            self.param_dtype,
        )
        if self.gather_kernel:
            kernel = nn.with_logical_constraint(kernel, (None,) * kernel.ndim)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        contract_x = tuple(range(x.ndim - self.n_in, x.ndim))
        contract_k = tuple(range(self.n_in))
        y = jax.lax.dot_general(
            x,
            kernel,
            ((contract_x, contract_k), ((), ())),
            preferred_element_type=self.out_dtype,
        )
        if self.out_dtype is None:
            y = y.astype(self.dtype)
        if self.use_bias:
            bias_axes = self.bias_axes or tuple(self.kernel_axes)[self.n_in :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, tuple(bias_axes)),
                out_shape,
                self.param_dtype,
            )
            y = y + leading_axes(bias.astype(y.dtype), y.ndim)
        return y


class Embed(nn.Module):
    """Token embedding table E [V, d] ('vocab', 'embed'); ``attend`` gives tied-head logits."""

    vocab_size: int
    features: int
    embedding_init: Init = normal(1.0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.vocab_size, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens_BxN: Array) -> Array:
        # The lookup reads a whole (replicated) table: the all-gather FSDP does for every weight,
        # V·d numbers, less than the B·N·d rows it produces. A lookup into a width-split table
        # yields width-split rows, which the SPMD partitioner can only turn into batch-split rows
        # by replicating them (and the gradient's scatter likewise).
        table_VxD = nn.with_logical_constraint(self.embedding, (None, None))
        return jnp.take(table_VxD, tokens_BxN, axis=0).astype(self.dtype)

    def attend(self, x_BxNxD: Array) -> Array:
        """x·Eᵀ in float32 (the tied LM head)."""
        e_VxD = self.embedding.astype(self.dtype)
        return jnp.einsum(
            "...d,vd->...v", x_BxNxD.astype(self.dtype), e_VxD, preferred_element_type=jnp.float32
        )


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over features, eps 1e-5, affine (γ=1, β=0), exact two-pass variance."""
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(zeros, ("norm",)),
        name=name,
    )


def rms_norm(dtype: Dtype, name: str | None = None, eps: float = RMS_NORM_EPS) -> nn.RMSNorm:
    """Llama RMSNorm, eps 1e-6 (``eps``), weight 1."""
    return nn.RMSNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(ones, ("norm",)),
        name=name,
    )


class MLP(nn.Module):
    """Mixer channel MLP: FFN(z) = GELU(z A + a) C + a′ with A: d -> r·d, C: r·d -> d.

    ``activation='silu'`` and ``kaiming=True`` give the SRM block's FFN. Works on any
    leading shape ([B, N, d] or one position [B, d]).
    """

    d_model: int
    mlp_ratio: int = 4
    reference: bool = True
    dtype: Dtype = jnp.float32
    activation: str = "gelu"
    kaiming: bool = False

    @nn.compact
    def __call__(self, x_BxNxD: Array) -> Array:
        d, f = self.d_model, self.mlp_ratio * self.d_model
        k1, b1 = linear_inits(self.reference, d, self.kaiming)
        k2, b2 = linear_inits(self.reference, f, self.kaiming)
        fc1 = Linear((f,), ("embed", "mlp"), kernel_init=k1, bias_init=b1, dtype=self.dtype, name="fc1")
        fc2 = Linear((d,), ("mlp", "embed"), kernel_init=k2, bias_init=b2, dtype=self.dtype, name="fc2")
        h_BxNxF = fc1(x_BxNxD)
        if h_BxNxF.ndim == 3:
            h_BxNxF = nn.with_logical_constraint(h_BxNxF, ("batch", "length", "act_mlp"))
        h_BxNxF = nn.silu(h_BxNxF) if self.activation == "silu" else gelu(h_BxNxF, self.reference)
        return fc2(h_BxNxF)


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate x) ⊙ up x), no biases, N(0, 0.02²) init."""

    d_model: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: Array) -> Array:
        init = normal(0.02)
        kw = dict(use_bias=False, kernel_init=init, dtype=self.dtype)
        gate = Linear((self.hidden,), ("embed", "mlp"), name="gate", **kw)
        up = Linear((self.hidden,), ("embed", "mlp"), name="up", **kw)
        down = Linear((self.d_model,), ("mlp", "embed"), name="down", **kw)
        h_BxNxF = nn.silu(gate(x_BxNxD)) * up(x_BxNxD)
        if h_BxNxF.ndim == 3:
            h_BxNxF = nn.with_logical_constraint(h_BxNxF, ("batch", "length", "act_mlp"))
        return down(h_BxNxF)


def lm_head(vocab_size: int, kernel_init: Init, dtype: Dtype) -> Linear:
    """The untied LM head d -> V: no bias, float32 logits (assign it to ``self.head``)."""
    return Linear((vocab_size,), ("embed", "vocab"), use_bias=False, kernel_init=kernel_init,
                  dtype=dtype, out_dtype=jnp.float32)


def _layer_scan(n_layers: int, body: Callable, in_axes: tuple) -> Callable:
    """``nn.scan`` of ``body(block, carry, *xs)`` over ``n_layers`` layers, the block's parameters
    stacked along a leading axis named 'layers' (each layer its own init draw and dropout mask)."""
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=n_layers, metadata_params={nn.PARTITION_NAME: "layers"})


def scan_blocks(block: nn.Module, n_layers: int, x: Array, **kwargs) -> Array:
    """``x`` through ``n_layers`` layers of one ``block`` module whose parameters are stacked along
    a leading 'layers' axis (``model.scan_layers``): one ``lax.scan``, so the compiled step holds
    one block however deep the model is. ``kwargs`` go unchanged to every layer. Equal to calling
    L separate blocks with the same weights in order (tested)."""
    names = tuple(kwargs)

    def body(module, carry, *values):
        return module(carry, **dict(zip(names, values))), None

    return _layer_scan(n_layers, body, (nn.broadcast,) * len(names))(block, x, *kwargs.values())[0]


def scan_depth(block: nn.Module, n_layers: int, depth: int, x: Array, **kwargs) -> Array:
    """The first ``depth`` of ``n_layers`` scanned layers: all (:func:`scan_blocks`) or none (x);
    a partial depth of stacked blocks is refused (``UserError``: use ``model.scan_layers=False``)."""
    if depth == n_layers:
        return scan_blocks(block, n_layers, x, **kwargs)
    if depth == 0:
        return x
    raise UserError(f"depth {depth} of {n_layers} scanned blocks: a partial depth needs "
                    "model.scan_layers=False (the same weights, one module per block)")


def stack_layer_caches(caches: Sequence[Any]) -> Any:
    """Per-layer step caches -> one cache whose leaves have a leading layer axis (scanned blocks)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)


def scan_blocks_step(block: nn.Module, n_layers: int, x_BxD: Array, pos: Array, cache: Any
                     ) -> tuple[Array, Any]:
    """The step form of :func:`scan_blocks`: ``cache`` from :func:`stack_layer_caches`."""
    def body(module, carry, p, c):
        return module(carry, p, c)

    pos = jnp.asarray(pos, jnp.int32)
    return _layer_scan(n_layers, body, (nn.broadcast, 0))(block, x_BxD, pos, cache)


# Rematerialisation (activation checkpointing) policies of the blocks (``train.remat``;
# docs/training.md#rematerialisation).
REMAT_POLICIES = ("none", "block", "matmuls_saved")


def rematerialized(block_cls: type, policy: str) -> type:
    """``block_cls`` with its activations recomputed in the backward pass per ``policy``:

    * 'none': ``block_cls`` itself; the backward pass reads every intermediate the forward kept.
    * 'block': only each block's input is kept; everything inside the block is recomputed from it
      during the backward pass (about one more forward pass of the blocks).
    * 'matmuls_saved': the outputs of the matmuls with a weight (dots without batch dimensions:
      the linears, flat token mixing) are kept as well; norms, activations, attention scores and
      probabilities and headed mixing (batched dots) are recomputed.

    The parameter tree and the numbers computed are the same under every policy.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")
    if policy == "none":
        return block_cls
    save = None if policy == "block" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(block_cls, policy=save, prevent_cse=True)


def _apply_block(block: nn.Module, *args):
    return block(*args)


def _apply_block_fwd(block: nn.Module, *args):
    return nn.vjp(_apply_block, block, *args)


def _apply_block_bwd(vjp_fn, y_t):
    # The backward pass of a rematerialised block recomputes its forward from the saved residuals.
    # A scheduler may hoist every block's recomputation to the end of the forward pass, keeping
    # all the activations alive at once and saving nothing (XLA's CPU compiler does, and it drops
    # optimization barriers before scheduling). So the residuals laid out like the activations
    # ([B, N, ...]) get a true data dependency on this block's output cotangent: r + 0·g[..., :1]
    # (local to each device, no collective; r itself for every finite g), and the recomputation
    # can only start once the backward pass has reached this block.
    vjp_fn, y_t = jax.lax.optimization_barrier((vjp_fn, y_t))
    zero_BxN = y_t[..., 0].astype(jnp.float32) * 0.0

    def tie(r):
        if not jnp.issubdtype(r.dtype, jnp.floating) or r.shape[:2] != zero_BxN.shape:
            return r
        return r + zero_BxN.reshape(zero_BxN.shape + (1,) * (r.ndim - 2)).astype(r.dtype)

    return jax.tree.map(tie, vjp_fn)(y_t)


_apply_block_in_order = nn.custom_vjp(_apply_block, forward_fn=_apply_block_fwd,
                                      backward_fn=_apply_block_bwd)


def call_block(parent: nn.Module, block: nn.Module, *args, policy: str = "none"):
    """``block(*args)`` (positional arguments); for a block made by :func:`rematerialized` with a
    policy other than 'none', its recomputation is scheduled right before its backward pass."""
    if policy == "none" or parent.is_initializing():
        return block(*args)
    return _apply_block_in_order(block, *args)


def run_blocks_step(blocks, x_BxD: Array, pos: Array, cache: tuple) -> tuple[Array, tuple]:
    """The step forms of ``blocks`` in order at position ``pos``: (output [B, d], new caches)."""
    pos = jnp.asarray(pos, jnp.int32)
    new = []
    for block, c in zip(blocks, cache):
        x_BxD, c = block(x_BxD, pos, c)
        new.append(c)
    return x_BxD, tuple(new)


def checked_depth(depth: int, n_layers: int) -> int:
    """``depth`` if 0 ≤ depth ≤ n_layers (a number of leading blocks to run), else ``UserError``."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= n_layers:
        raise UserError(f"depth {depth!r} is outside 0..{n_layers}: the model has {n_layers} blocks")
    return depth
