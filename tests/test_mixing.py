"""Token-mixing ops against plain loop references (REFERENCE §1.1, §2.1, §2.3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax.models import mixing


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _loop_causal_mix(w_NxN, x_BxNxD, c_N):
    """y_i = Σ_{j≤i} W_ij x_j + c_i, in float64 loops."""
    w, x, c = (np.asarray(a, np.float64) for a in (w_NxN, x_BxNxD, c_N))
    b, n, d = x.shape
    y = np.zeros((b, n, d))
    for i in range(n):
        for j in range(i + 1):
            y[:, i, :] += w[i, j] * x[:, j, :]
        y[:, i, :] += c[i]
    return y


def test_causal_mask():
    m = np.asarray(mixing.causal_mask(4))
    assert m.dtype == bool
    np.testing.assert_array_equal(m, np.tril(np.ones((4, 4), bool)))


def test_toeplitz_matrix_matches_loops():
    n = 9
    v = _rand(0, n)
    t = np.asarray(mixing.toeplitz_matrix(jnp.asarray(v)))
    ref = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(i + 1):
            ref[i, j] = v[i - j]
    np.testing.assert_array_equal(t, ref)
    # headed: one matrix per row of v
    v_h = _rand(1, 3, n)
    t_h = np.asarray(mixing.toeplitz_matrix(jnp.asarray(v_h)))
    for h in range(3):
        np.testing.assert_array_equal(t_h[h], np.asarray(mixing.toeplitz_matrix(jnp.asarray(v_h[h]))))


def test_dense_causal_mix_matches_loop():
    n, d = 12, 5
    w, x, c = _rand(0, n, n), _rand(1, 2, n, d), _rand(2, n)
    y = mixing.add_position_bias(mixing.dense_causal_mix(jnp.asarray(w), jnp.asarray(x)), jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(y), _loop_causal_mix(w, x, c), rtol=1e-5, atol=1e-5)
    # causal_mix dispatcher, flat
    y2 = mixing.causal_mix(jnp.asarray(x), mixing="flat", w=jnp.asarray(w), c=jnp.asarray(c))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))


@pytest.mark.parametrize("n", [1, 7, 64, 512])
def test_toeplitz_fft_equals_dense(n):
    v, x = _rand(n, n), _rand(n + 1, 2, n, 6)
    dense = np.asarray(mixing.toeplitz_mix_dense(jnp.asarray(v), jnp.asarray(x)))
    fft = np.asarray(mixing.toeplitz_mix_fft(jnp.asarray(v), jnp.asarray(x)))
    scale = np.abs(dense).max()
    np.testing.assert_allclose(fft, dense, rtol=0, atol=2e-6 * scale)
    # the dense Toeplitz path against the loop definition
    t = np.asarray(mixing.toeplitz_matrix(jnp.asarray(v)))
    if n <= 64:
        np.testing.assert_allclose(dense, _loop_causal_mix(t, x, np.zeros(n)), rtol=1e-5, atol=1e-4)


def test_headed_toeplitz_fft_equals_dense():
    n, h, k = 128, 3, 4
    v, x = _rand(0, h, n), _rand(1, 2, n, h, k)
    dense = np.asarray(mixing.headed_toeplitz_mix_dense(jnp.asarray(v), jnp.asarray(x)))
    fft = np.asarray(mixing.headed_toeplitz_mix_fft(jnp.asarray(v), jnp.asarray(x)))
    np.testing.assert_allclose(fft, dense, rtol=0, atol=2e-6 * np.abs(dense).max())


def test_fft_bf16_input_returns_bf16():
    v, x = jnp.asarray(_rand(0, 16)), jnp.asarray(_rand(1, 1, 16, 4)).astype(jnp.bfloat16)
    assert mixing.toeplitz_mix_fft(v, x).dtype == jnp.bfloat16


def test_straight_through_same_forward_unmasked_gradient():
    n, d = 8, 3
    w, x = jnp.asarray(_rand(0, n, n)), jnp.asarray(_rand(1, 2, n, d))
    g_out = jnp.asarray(_rand(2, 2, n, d))

    def loss(w, mode):
        return jnp.sum(mixing.dense_causal_mix(w, x, mode) * g_out)

    y_m = mixing.dense_causal_mix(w, x, "masked")
    y_st = mixing.dense_causal_mix(w, x, "straight_through")
    np.testing.assert_array_equal(np.asarray(y_st), np.asarray(y_m))  # bit-identical forward
    g_m = np.asarray(jax.grad(loss)(w, "masked"))
    g_st = np.asarray(jax.grad(loss)(w, "straight_through"))
    upper = ~np.tril(np.ones((n, n), bool))
    assert np.all(g_m[upper] == 0)
    assert np.all(g_st[upper] != 0)
    np.testing.assert_allclose(g_st[~upper], g_m[~upper], rtol=1e-6)
    # REFERENCE §1.1: for k = 1 the upper entries get Σ_{b,f} dL/dy_{b,i,f} · x_{b,j,f}
    full = np.einsum("bif,bjf->ij", np.asarray(g_out), np.asarray(x))
    np.testing.assert_allclose(g_st, full, rtol=1e-5, atol=1e-5)


def _headed_loop_reference(p, x, heads, expanded=False):
    """Per-head loop: z_h = x P_h + p_h; u_h = causal mix; concat; out projection."""
    x = np.asarray(x, np.float64)
    b, n, d = x.shape
    pk, pb = np.asarray(p["proj"]["kernel"], np.float64), np.asarray(p["proj"]["bias"], np.float64)
    concat = []
    for h in range(heads):
        z = x @ pk[:, h, :] + pb[h]
        if expanded:
            u = _loop_causal_mix(np.asarray(p["w1"])[h], z, np.asarray(p["c1"])[h])
            u = np.asarray(nn.gelu(jnp.asarray(u, jnp.float32), approximate=False), np.float64)
            u = _loop_causal_mix(np.asarray(p["w2"])[h], u, np.asarray(p["c2"])[h])
        else:
            u = _loop_causal_mix(np.asarray(p["w"])[h], z, np.asarray(p["c"])[h])
        concat.append(u)
    cat = np.concatenate(concat, axis=-1)  # head-major features
    ok = np.asarray(p["out"]["kernel"], np.float64).reshape(d, d)
    return cat @ ok + np.asarray(p["out"]["bias"], np.float64)


@pytest.mark.parametrize("expanded", [False, True])
def test_headed_mixing_matches_per_head_loop(expanded):
    n, d, heads = 8, 12, 3
    mod = mixing.TokenMixing(n_ctx=n, d_model=d, heads=heads, expanded=expanded)
    x = jnp.asarray(_rand(0, 2, n, d))
    params = nn.meta.unbox(mod.init(jax.random.key(1), x)["params"])
    assert params["w1" if expanded else "w"].shape == (heads, n, n)
    y = np.asarray(mod.apply({"params": params}, x))
    np.testing.assert_allclose(y, _headed_loop_reference(params, x, heads, expanded), rtol=1e-4, atol=1e-5)


def test_headed_toeplitz_module_fft_equals_dense():
    n, d, heads = 16, 8, 2
    x = jnp.asarray(_rand(0, 2, n, d))
    dense = mixing.TokenMixing(n_ctx=n, d_model=d, mixing="toeplitz", heads=heads, impl="dense")
    fft = mixing.TokenMixing(n_ctx=n, d_model=d, mixing="toeplitz", heads=heads, impl="fft")
    params = dense.init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(
        np.asarray(fft.apply({"params": params}, x)),
        np.asarray(dense.apply({"params": params}, x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_reference_mixing_inits():
    n = 64
    w_init, c_init = mixing.mixing_inits("flat", True, n)
    w = np.asarray(w_init(jax.random.key(0), (n, n)))
    assert np.abs(w).max() <= 1 / np.sqrt(n) and np.abs(w).max() > 0.9 / np.sqrt(n)
    v_init, c_init = mixing.mixing_inits("toeplitz", True, n)
    v = np.asarray(v_init(jax.random.key(0), (4096,)))
    assert 0.9 < v.std() < 1.1
    assert np.all(np.asarray(c_init(jax.random.key(0), (n,))) == 0)
