"""Analytic FLOPs per token against XLA's cost analysis of the training gradient (the lowered HLO
module: the same count as the compiled one to within 0.5% here, without a multi-second compile)."""
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn

from mixers_jax import flops
from mixers_jax.config import base_config
from mixers_jax.models import build_model

B, N = 2, 256


def _cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=512, n_ctx=N, d_model=256, n_layers=2))
    cfg.update(overrides)
    return cfg


def _xla_flops_per_token(cfg):
    model = build_model(cfg)
    tokens = jax.ShapeDtypeStruct((B, N), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

    def loss(p, t):
        logits = model.apply({"params": p}, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    cost = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
        cost = cost[0]
    return cost["flops"] / (B * N)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("flat", dict()),  # 'auto': blocked at n = 256
        ("flat_dense", dict(mixing_impl="dense")),
        ("headed", dict(heads=4)),
        ("headed_dense", dict(heads=4, mixing_impl="dense")),
        ("expanded_blocked", dict(expanded=True, mixing_impl="blocked")),
        ("toeplitz_dense", dict(mixing="toeplitz", mixing_impl="dense")),
        ("toeplitz_blocked", dict(mixing="toeplitz")),
        ("toeplitz_fft", dict(mixing="toeplitz", mixing_impl="fft")),
        ("transformer", dict(kind="transformer", n_heads=4)),
        ("gpt", dict(kind="transformer", transformer="gpt", n_heads=4)),
        ("mixer_no_mlp", dict(mlp="none")),
        ("transformer_mlp_attention", dict(kind="transformer", n_heads=4, mlp="attention")),
        # an imported Llama's shape (docs/hf_import.md): GQA, head width, SwiGLU width
        ("llama_gqa", dict(kind="transformer", n_heads=4, n_kv_heads=2, head_dim=16,
                           mlp_hidden=40)),
        # transformer-mixer hybrids (docs/transformer_baseline.md#hybrids)
        ("transfixer", dict(kind="transformer", n_heads=4, hybrid="series", mixing_impl="dense")),
        ("parallel_hybrid_headed", dict(kind="transformer", n_heads=4, hybrid="parallel",
                                        heads=2)),
        ("bidirectional_mixer", dict(bidirectional=True, mixing_impl="dense")),
        # mixer block variants (docs/masked_mixers.md#other-block-variants)
        ("parallel_mixers_softmax", dict(parallel_mixers=3, softmax_mixer=True, mixing_impl="dense")),
    ],
)
def test_flops_per_token_matches_xla(name, overrides):
    cfg = _cfg(**overrides)
    analytic = flops.flops_per_token(cfg, training=True)
    measured = _xla_flops_per_token(cfg)
    ratio = analytic / measured
    print(f"{name}: analytic {analytic:.4g} / XLA {measured:.4g} = {ratio:.4f}")
    assert 0.95 <= ratio <= 1.05, (name, analytic, measured, ratio)


def test_training_is_three_forwards():
    cfg = _cfg(mixing_impl="dense")
    assert flops.flops_per_token(cfg, training=True) == 3 * flops.flops_per_token(cfg, training=False)
    # flat mixer forward: per layer 2·n·d (mixing) + 2·8d² (FFN), plus 2·d·V for the head
    n, d, v = 256, 256, 512
    assert flops.flops_per_token(cfg, training=False) == 2 * (2 * n * d + 16 * d * d) + 2 * d * v


@pytest.mark.parametrize("impl", ["blocked", "pallas", "auto"])
def test_blocked_mixing_counts_the_block_triangle(impl):
    """n = 256 in blocks of 128: row block 0 reads 128 inputs, block 1 all 256, so the mixing
    does (128·128 + 128·256) / 256² = 3/4 of the dense product's multiply-adds."""
    n, d, v = 256, 256, 512
    cfg = _cfg(mixing_impl=impl)
    assert flops.flops_per_token(cfg, training=False) == 2 * (0.75 * 2 * n * d + 16 * d * d) + 2 * d * v


def test_peak_flops_and_mfu():
    dev = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
    assert flops.peak_flops_per_second(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops_per_second(dev("NVIDIA H200")) == 989e12
    assert flops.peak_flops_per_second(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert flops.peak_flops_per_second(dev("TPU v4", "tpu")) == 275e12
    assert flops.peak_flops_per_second(dev("TPU v5 lite", "tpu")) == 197e12
    assert flops.peak_flops_per_second(dev("TPU v5p", "tpu")) == 459e12
    assert flops.peak_flops_per_second(dev("TPU v6e", "tpu")) == 918e12
    assert flops.peak_flops_per_second(dev("Quantum Abacus")) is None
    assert flops.peak_flops_per_second(jax.devices("cpu")[0]) is None
    assert flops.mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)
    assert flops.mfu(1e9, 1e5, None) is None
