"""Block-triangular ('blocked') and Pallas ('pallas', interpret mode on CPU) causal mixing against
the dense masked matmul: values and gradients (inputs, W with both mask gradients, c), flat /
headed / expanded, n not a multiple of the block; the 'auto' rule; the FLOP counts; parameter
trees; resuming a run saved with another mixing_impl."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax import flops, workdir as workdir_lib
from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, mixing, mixing_blocked, mixing_math, mixing_pallas
from mixers_jax.models.specs import mixer_spec

TOL = dict(rtol=1e-5, atol=1e-5)


def _dense(w, x, c, mask_grad):
    mix = mixing_math.headed_dense_mix if x.ndim == 4 else mixing_math.dense_mix
    return mixing_math.add_position_bias(mix(mixing_math.mask_weight(w, mask_grad), x), c)


def _inputs(x_shape, heads, seed=0):
    n = x_shape[1]
    k = jax.random.split(jax.random.key(seed), 4)
    lead = (heads,) if heads else ()
    return (jax.random.normal(k[0], lead + (n, n)), jax.random.normal(k[1], x_shape),
            jax.random.normal(k[2], lead + (n,)), jax.random.normal(k[3], x_shape))


def _value_and_vjp(f):
    @jax.jit
    def run(args, dy):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)
    return run


def _assert_vjp_equal(f, g, args, dy):
    (y_f, grads_f), (y_g, grads_g) = _value_and_vjp(f)(args, dy), _value_and_vjp(g)(args, dy)
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_g), **TOL)
    for a, b in zip(grads_f, grads_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


CASES = [pytest.param((2, 40, 8), 0, id="flat"), pytest.param((2, 40, 2, 8), 2, id="headed")]
MASK_GRADS = ["masked", "straight_through"]


@pytest.mark.parametrize("x_shape,heads", CASES)
@pytest.mark.parametrize("mask_grad", MASK_GRADS)
@pytest.mark.parametrize("block", [16, 64])  # n = 40 = 2·16 + 8: the last block is short; 64: one
def test_blocked_equals_dense(x_shape, heads, mask_grad, block):
    w, x, c, dy = _inputs(x_shape, heads)
    blocked = lambda w, x, c: mixing_math.add_position_bias(  # noqa: E731
        mixing_blocked.blocked_mix(w, x, block, mask_grad == "straight_through"), c)
    _assert_vjp_equal(blocked, lambda w, x, c: _dense(w, x, c, mask_grad), (w, x, c), dy)


@pytest.mark.parametrize("x_shape,heads", CASES)
@pytest.mark.parametrize("mask_grad", MASK_GRADS)
def test_pallas_kernel_in_interpret_mode_equals_dense(x_shape, heads, mask_grad):
    """n = 40 with 16-blocks is zero-padded to 48 inside; features 8 padded to 16."""
    w, x, c, dy = _inputs(x_shape, heads, seed=1)
    pallas = lambda w, x, c: mixing_pallas.pallas_mix(  # noqa: E731
        w, x, c, 16, mask_grad == "straight_through")
    _assert_vjp_equal(pallas, lambda w, x, c: _dense(w, x, c, mask_grad), (w, x, c), dy)


def test_straight_through_gives_the_upper_triangle_its_gradient():
    w, x, c, dy = _inputs((2, 40, 8), 0, seed=2)
    upper = ~np.tril(np.ones((40, 40), bool))
    for straight, expect_zero in ((False, True), (True, False)):
        _, vjp = jax.vjp(lambda w: mixing_blocked.blocked_mix(w, x, 16, straight), w)
        dw = np.asarray(vjp(dy)[0])
        assert (np.all(dw[upper] == 0)) == expect_zero


def _model_cfg(n, impl, mask_grad, **kw):
    cfg = base_config().model
    cfg.update(dict(vocab_size=32, n_ctx=n, d_model=8, n_layers=1, mixing_impl=impl,
                    mask_grad=mask_grad, reference=True, **kw))
    return cfg


def _loss_and_grads(cfg, tokens):
    model = build_model(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens) ** 2)

    return params, jax.jit(jax.value_and_grad(loss))(params)


FLAT, HEADED, EXPANDED = dict(), dict(heads=2), dict(heads=2, expanded=True)


@pytest.mark.parametrize("variant,impl,mask_grad", [
    pytest.param(FLAT, "blocked", "masked", id="flat-blocked-masked"),
    pytest.param(FLAT, "blocked", "straight_through", id="flat-blocked-straight_through"),
    pytest.param(EXPANDED, "blocked", "masked", id="headed_expanded-blocked-masked"),
    pytest.param(HEADED, "blocked", "straight_through", id="headed-blocked-straight_through"),
    pytest.param(FLAT, "pallas", "masked", id="flat-pallas-masked"),
    pytest.param(EXPANDED, "pallas", "straight_through", id="headed_expanded-pallas-straight_through"),
])
def test_model_with_each_impl_equals_dense(variant, impl, mask_grad):
    """n = 150 in blocks of 64 (the rule's block below n = 256): three row blocks, the last one
    short. The parameter tree is the same; loss and every parameter gradient match dense."""
    n = 150
    tokens = jax.random.randint(jax.random.key(3), (2, n), 0, 32)
    params_d, (loss_d, grads_d) = _loss_and_grads(_model_cfg(n, "dense", mask_grad, **variant), tokens)
    params_b, (loss_b, grads_b) = _loss_and_grads(_model_cfg(n, impl, mask_grad, **variant), tokens)
    assert jax.tree.structure(params_d) == jax.tree.structure(params_b)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params_d, params_b)
    np.testing.assert_allclose(float(loss_b), float(loss_d), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL),
                 grads_b, grads_d)


def test_auto_rule_is_a_function_of_the_shapes():
    r = mixing.resolve_impl
    assert r("auto", 127) == "dense" and r("auto", 128) == "blocked" and r("auto", 4096) == "blocked"
    assert r("auto", 512, kernel=4) == "dense" and r("auto", 512, causal=False) == "dense"
    assert r("dense", 512) == "dense" and r("fft", 512) == "fft" and r("pallas", 16) == "pallas"
    assert mixing_blocked.block_size(128) == 64 and mixing_blocked.block_size(255) == 64
    assert mixing_blocked.block_size(256) == 128 and mixing_blocked.block_size(512) == 128
    assert mixing_blocked.block_size(1024) == 256 and mixing_blocked.block_size(4096) == 1024
    assert mixing_pallas.kernel_blocks(4096, 256, 1024) == (128, 64)
    assert mixing_pallas.kernel_blocks(40, 8, 16) == (16, 16)
    for n, expected in ((64, "dense"), (128, "blocked"), (512, "blocked")):
        specs = {mixer_spec(_model_cfg(n, "auto", "masked")).token_mixing.impl for _ in range(2)}
        assert specs == {expected}
    # the main job's sub-models (16-token chunks, 20-position decoder) stay dense
    assert mixer_spec(_model_cfg(20, "auto", "masked", heads=4)).token_mixing.impl == "dense"


def test_block_impls_refuse_what_they_cannot_compute():
    for impl in ("blocked", "pallas"):
        with pytest.raises(UserError, match="needs causal mixing with model.kernel=1"):
            mixer_spec(_model_cfg(32, impl, "masked", kernel=4))
        with pytest.raises(UserError, match="needs causal mixing"):
            mixer_spec(_model_cfg(32, impl, "masked", causal=False))
    with pytest.raises(UserError, match="mixing_impl must be one of"):
        mixer_spec(_model_cfg(32, "sparse", "masked"))


def test_blocked_flop_count_matches_xla():
    """XLA's cost of the blocked forward + backward is 3 × the counted fraction of the dense
    product (n = 150, blocks of 64: (64·64 + 64·128 + 22·150) / 150²), and below the dense one."""
    n, b, f = 150, 64, 32
    frac = mixing_blocked.blocked_work_fraction(n, b)
    assert frac == pytest.approx((64 * 64 + 64 * 128 + 22 * 150) / n**2)
    w, x = jnp.ones((1, n, n)), jnp.ones((1, n, f))

    def cost(fn):
        grad = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(fn(w, x) ** 2), argnums=(0, 1)))
        c = grad.lower(w, x).cost_analysis()
        return (c[0] if isinstance(c, (list, tuple)) else c)["flops"]

    dense = cost(lambda w, x: mixing_math.dense_mix(w[0], x[0][None])[0])
    assert dense == pytest.approx(3 * 2.0 * n * n * f, rel=0.05)  # + the elementwise ops
    blocked = cost(lambda w, x: mixing_blocked.blocked_causal_mix(w, x, b))
    assert blocked == pytest.approx(frac * dense, rel=0.05)
    spec = mixing.MixingSpec(n_ctx=n, d_model=f, impl="blocked")
    assert mixing.dense_flops_per_token(spec, f) * n == pytest.approx(frac * 2.0 * n * n * f)


def test_a_run_saved_with_another_mixing_impl_resumes(tmp_path):
    config = base_config()
    saved = config.to_dict()
    saved["model"]["mixing_impl"] = "dense"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert workdir_lib.check_workdir_compatible(config, str(tmp_path))
    assert flops.flops_per_token(config.model) < flops.flops_per_token(saved["model"])
